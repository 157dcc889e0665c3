"""Credentials a request carries never reach a log: bearer and basic credentials, session ids
(header and cookie), other cookies, JWTs and opaque tokens in odd headers, token query
parameters, and whatever a malformed request carries where it goes wrong. Checked in what each
audit sink actually wrote (stdout, the file, the PostgreSQL table: record and columns) and in
the server's own log at its most verbose level."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import yaml

from authz_server.audit.sinks.postgres import split_url
from authz_server.config import Config
from authz_server.identity.sessions import new_session_id
from authz_server.mesh.processes import Supervisor
from tests.support import rawhttp
from tests.support.audit import (TRUST_DOMAIN, assert_no_secret, check_request_bytes, eventually, grpc_check, jsonl,
                                 open_session, postgres_table, secret_headers, secret_path, workload,
                                 write_audit_policy)
from tests.support.authz import running_app
from tests.support.jwt import AUDIENCE, ISSUER, issuer_jwks, issuer_token


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


# -- the server's own log, at its most verbose level

def _secret(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


class Seeded:
    """What the requests carry: ``credentials`` must reach no log at all; the other ``values``
    (a principal, a header, a path) are recorded by the audit log by design, but the server's
    own log names the field that was wrong, never its content."""

    def __init__(self) -> None:
        self.credentials: list[str] = []
        self.values: list[str] = []

    def credential(self, label: str) -> str:
        self.credentials.append(_secret(label))
        return self.credentials[-1]

    def value(self, label: str) -> str:
        self.values.append(_secret(label))
        return self.values[-1]

    def token(self, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token signed by the trusted issuer (its header and claims may carry values)."""
        self.credentials.append(issuer_token(time.time(), header=header, **claims))
        return self.credentials[-1]


def _grpc_requests(seeded: Seeded) -> dict[str, bytes]:
    """One CheckRequest per way a request can go wrong, each carrying a secret where it goes wrong."""
    web = workload("web")
    good = seeded.token(jti=_secret("jti"))
    headers, header_secrets = secret_headers(new_session_id())
    path, query_secrets = secret_path("/orders/1")
    seeded.credentials += header_secrets + query_secrets
    without_session = {k: v for k, v in headers.items() if k not in ("x-session-id", "cookie")}
    json_type = {"content-type": "application/json"}
    field = seeded.value("field")
    multipart = (f'--b\r\ncontent-disposition: form-data; name="{field}"\r\ncontent-type: application/json'
                 f'\r\n\r\n{{"{field}": \r\n--b--\r\n')
    tokens = {
        "kid": seeded.token(header={"kid": seeded.value("kid")}),
        "issuer": seeded.token(iss=seeded.value("issuer")),
        "aud": seeded.token(aud=seeded.value("aud")),
        "typ": seeded.token(header={"typ": seeded.value("typ")}),
        "alg": seeded.token(header={"alg": seeded.value("alg")}),
        "crit": seeded.token(header={"crit": [crit := seeded.value("crit")], crit: 1}),
    }
    return {
        "allowed": check_request_bytes(path, principal=web, headers={**without_session,
                                                                     "authorization": f"Bearer {good}"}),
        "unknown_session": check_request_bytes(path, principal=web, headers=headers),
        "replayed": check_request_bytes(path, principal=workload("thief"), headers={"authorization": f"Bearer {good}"}),
        "bad_query": check_request_bytes(f"/orders?password={seeded.credential('query')};x=1", principal=web),
        "bad_escape": check_request_bytes(f"/orders?token={seeded.credential('escape')}%zz", principal=web),
        "bad_body": check_request_bytes("/orders", principal=web, method="POST", headers=json_type,
                                        body=f'{{"password": "{seeded.credential("body")}",'),
        "bad_length": check_request_bytes("/orders", principal=web, method="POST", body="{}",
                                          headers={**json_type, "content-length": seeded.value("length")}),
        "bad_multipart": check_request_bytes("/orders", principal=web, method="POST", body=multipart,
                                             headers={"content-type": "multipart/form-data; boundary=b"}),
        "not_a_jwt": check_request_bytes("/orders", principal=web,
                                         headers={"authorization": f"Bearer {seeded.credential('bearer')}"}),
        **{f"token_{name}": check_request_bytes("/orders", principal=web, headers={"authorization": f"Bearer {token}"})
           for name, token in tokens.items()},
        "bad_spiffe_id": check_request_bytes("/orders", principal=f"spiffe://{TRUST_DOMAIN}/{seeded.value('id')} x"),
        "bad_tls_header": check_request_bytes("/orders", principal=web,
                                              headers={"x-authz-tls-version": seeded.value("tls")}),
        "not_protobuf": b"\x0a\x7f" + seeded.value("proto").encode(),
    }


def _http_requests(seeded: Seeded) -> dict[str, bytes]:
    token, smuggled = seeded.token(jti=_secret("jti")), seeded.value("smuggled")
    return {
        "not_a_path": f"GET /check{seeded.value('target')} HTTP/1.1\r\nhost: orders\r\n\r\n".encode(),
        "bad_query": f"GET /check/orders?password={seeded.credential('query')};x HTTP/1.1\r\nhost: o\r\n\r\n".encode(),
        "allowed": (f"GET /check/orders/2 HTTP/1.1\r\nhost: orders\r\nauthorization: Bearer {token}\r\n"
                    f"cookie: theme=dark; csrf={seeded.credential('cookie')}\r\n\r\n").encode(),
        "oversized": (f"GET /check/orders HTTP/1.1\r\nhost: orders\r\n"
                      f"x-big: {seeded.value('header')}{'x' * 70_000}\r\n\r\n").encode(),
        "smuggled": (f"POST /check/orders HTTP/1.1\r\nhost: orders\r\ncontent-length: 0\r\n"
                     f"content-length: {len(smuggled) + 2}\r\n\r\n{smuggled}\r\n").encode(),
    }


async def test_no_secret_in_the_server_log_at_debug_level_nor_in_the_audit_log(
        supervisor: Supervisor, tmp_path: Path) -> None:
    """A real server at --log-level debug (every message of every level), with both fronts and a
    file audit sink: requests that are allowed, replayed, malformed in every way the pipeline
    explains, each with a secret seeded where it goes wrong. Not one in either log."""
    policies = write_audit_policy(tmp_path / "policies")
    (tmp_path / "idp.jwks.json").write_text(json.dumps(issuer_jwks()))
    audit_file, ready = tmp_path / "audit.jsonl", tmp_path / "ready.json"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0", "metrics_addr": "", "policies": str(policies),
        "log_level": "debug", "audit": [f"file:{audit_file}"], "trust_domains": [TRUST_DOMAIN],
        "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(tmp_path / "idp.jwks.json")}],
    }))
    server = supervisor.start("authz", [sys.executable, "-m", "authz_server.cli", "serve", "--config", str(config),
                                        "--workers", "1", "--ready-file", str(ready)], ready=ready.exists, timeout=60)
    bound = json.loads(ready.read_text())
    seeded = Seeded()
    grpc_requests, http_requests = _grpc_requests(seeded), _http_requests(seeded)
    async with grpc.aio.insecure_channel(bound["addr"]) as channel:
        check = grpc_check(channel)
        answers = {name: await check(request, timeout=30) for name, request in grpc_requests.items()}
    assert answers["allowed"].status.code == 0, answers["allowed"]
    assert all(answers[name].status.code != 0 for name in answers if name != "allowed")
    seeded.credentials += [h.header.value for h in answers["allowed"].ok_response.response_headers_to_add
                           if h.header.key == "x-session-id"]
    statuses = {name: (await rawhttp.exchange(bound["http_addr"], request, timeout=30)).statuses
                for name, request in http_requests.items()}
    assert statuses == {"not_a_path": [400], "bad_query": [400], "allowed": [200], "oversized": [431],
                        "smuggled": [400]}
    decisions = len(grpc_requests) + 3  # and the HTTP requests that were read whole
    await eventually(lambda: audit_file.exists() and len(audit_file.read_text().splitlines()) >= decisions,
                     timeout=30, what="every decision in the audit file")
    server.stop()

    log_text, audit_text = server.log_path.read_text(), audit_file.read_text()
    assert " DEBUG " in log_text  # the level really was debug
    for code in ("token_replay", "session_unknown", "bad_query", "bad_body", "bad_request", "malformed_token",
                 "unknown_kid", "untrusted_issuer", "wrong_audience", "wrong_typ", "alg_not_allowed",
                 "unsupported_crit", "invalid_spiffe_id", "invalid_tls_version", "malformed_request", "bad_path"):
        assert f": {code}: " in log_text, f"no {code} deny in the server log"
    assert len(seeded.credentials) > 20 and len(seeded.values) > 10
    assert_no_secret(log_text, seeded.credentials + seeded.values, "the server log")
    assert_no_secret(audit_text, seeded.credentials, "the audit log")
