"""Credentials a request carries never reach an audit sink: bearer and basic credentials,
session ids (header and cookie), other cookies, JWTs and opaque tokens in odd headers,
token query parameters. Checked in what each sink actually wrote: stdout, the file,
and the PostgreSQL table (record and columns)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from authz_server.audit.sinks.postgres import split_url
from authz_server.config import Config
from tests.support.audit import (TRUST_DOMAIN, assert_no_secret, check_request_bytes, grpc_check, jsonl,
                                 open_session, postgres_table, secret_headers, secret_path, workload,
                                 write_audit_policy)
from tests.support.authz import running_app


async def test_no_secret_in_any_sink(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "audit.jsonl"
    with postgres_table() as pg_url:
        config = Config(policies=str(write_audit_policy(tmp_path / "policies")), addr="127.0.0.1:0",
                        metrics_addr="", trust_domains=(TRUST_DOMAIN,),
                        audit=("stdout", f"file:{log_file}", pg_url))
        async with running_app(config) as app:
            assert app.audit is not None and app.identity is not None
            web = workload("web")
            session = await open_session(app.identity.store, subject="alice", spiffe_id=web, now=time.time())
            headers, secrets = secret_headers(session)
            path, query_secrets = secret_path("/orders/1")
            secrets += query_secrets
            requests = [
                check_request_bytes(path, principal=web, headers=headers),  # alice's session: allowed
                check_request_bytes(path, principal=web, headers=headers),  # the same again: a cache hit
                check_request_bytes(path, principal=workload("thief"), headers=headers),  # stolen session
                check_request_bytes("/public/x", principal=web, headers={k: v for k, v in headers.items()
                                                                          if k != "x-session-id"}),
                b"\x0a\x03\x0a\x01",  # a CheckRequest that does not decode: refused before facts exist
            ]
            async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
                check = grpc_check(channel)
                responses = await asyncio.gather(*(check(r) for r in requests))
            await app.audit.drain()
        assert [r.status.code for r in responses][:3] == [0, 0, 16]  # OK, OK, UNAUTHENTICATED

        file_text = log_file.read_text()
        stdout_text = capfd.readouterr().out
        conninfo, table = split_url(pg_url)
        with psycopg.connect(conninfo) as conn:
            rows = conn.execute(f'SELECT record::text, subject, spiffe_id, code FROM "{table[0]}"').fetchall()
    records = list(jsonl(log_file))
    assert len(records) == len(rows) == len(stdout_text.splitlines()) == len(requests)
    for text in (file_text, stdout_text, "\n".join(" ".join(str(c) for c in row) for row in rows)):
        assert_no_secret(text, secrets)
    allowed = next(r for r in records if r["allowed"] and r["subject"] == "alice" and not r["cached"])
    http = allowed["input"]["attributes"]["request"]["http"]
    assert http["headers"]["authorization"] == "Bearer [REDACTED]"  # the auditor still sees how they called
    assert http["headers"]["cookie"].startswith("theme=[REDACTED]; __Host-authz-session=[REDACTED]")
    assert allowed["input"]["identity"]["session"]["id_sha256"]
    assert any(r["reason"] == "session_bound_elsewhere" for r in records)
