"""Credentials a request carries never reach a trace: decisions made with bearer and basic
credentials, session ids (header and cookie), other cookies, JWTs and opaque tokens in odd
headers, token query parameters and W3C baggage, through the gRPC front and the HTTP front,
allowed, denied and refused; checked in the spans a real OTLP collector received, byte by byte."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest

from authz_server.config import Config
from tests.support.audit import (TRUST_DOMAIN, assert_no_secret, check_request_bytes, grpc_check, open_session,
                                 secret_headers, secret_path, workload, write_audit_policy)
from tests.support.authz import running_app
from tests.support.otlp import OtlpReceiver


async def test_no_secret_in_any_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        config = Config(policies=str(write_audit_policy(tmp_path / "policies")), http_addr="127.0.0.1:0",
                        trust_domains=(TRUST_DOMAIN,))
        async with running_app(config) as app:
            assert app.identity is not None and app.tracing is not None
            web = workload("web")
            session = await open_session(app.identity.store, subject="alice", spiffe_id=web, now=time.time())
            headers, seeded = secret_headers(session)
            path, query_secrets = secret_path("/orders/1")
            baggage_secret = "bag-" + uuid.uuid4().hex
            seeded += [*query_secrets, baggage_secret]
            headers["baggage"] = f"token={baggage_secret},tenant=blue"

            def traced(extra: dict[str, str]) -> dict[str, str]:
                return {**headers, **extra, "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}

            requests = [
                check_request_bytes(path, principal=web, headers=traced({})),  # alice's session: allowed
                check_request_bytes(path, principal=web, headers=traced({})),  # the same again: a cache hit
                check_request_bytes(path, principal=workload("thief"), headers=traced({})),  # stolen session
                check_request_bytes("/public/x", principal=web,
                                    headers={k: v for k, v in traced({}).items() if k != "x-session-id"}),
                b"\x0a\x03\x0a\x01",  # does not decode: refused before facts exist
            ]
            async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
                check = grpc_check(channel)
                answers = await asyncio.gather(*(check(r) for r in requests))
            async with httpx.AsyncClient(base_url=f"http://{app.bound['http_addr']}", timeout=10) as client:
                over_http = [await client.get(f"/check{target}", headers={
                    **traced({}), "x-forwarded-client-cert": f"URI={principal}"})
                    for target, principal in ((path, web), (path, workload("thief")), ("/busy", web))]
            ids = [a.dynamic_metadata["decision_id"] for a in answers] + \
                [r.headers["x-authz-decision-id"] for r in over_http]
            spans = await asyncio.to_thread(receiver.wait_for, lambda got: {
                s.attributes.get("authz.decision_id") for s in got} >= set(ids), what="a span per decision")
    assert [a.status.code for a in answers][:3] == [0, 0, 16]
    assert [r.status_code for r in over_http] == [200, 401, 429]
    wire = b"".join(span.raw for span in spans)
    text = wire.decode("utf-8", "replace") + repr([(s.attributes, s.events) for s in spans])
    assert_no_secret(text, seeded)
    assert b"[REDACTED]" not in wire  # names only: nothing needed masking, nothing was copied
    allowed = next(s for s in spans if s.attributes["authz.decision_id"] == ids[0])
    assert allowed.attributes["authz.subject"] == "alice" and allowed.attributes["authz.identity.method"] == "session"
