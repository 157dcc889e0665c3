"""Helpers for the audit log tests: requests with secrets in every place, a policy that
allows some and denies others by path, a private PostgreSQL table per test (on the test run's
own server, ``tests/support/postgres.py``: never the machine's)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import jwt

from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.facts import Facts
from authz_server.identity.sessions import Binding, Session, new_session_id, session_key

TRUST_DOMAIN = "example.org"

AUDIT_POLICY = """
package envoy.authz
import rego.v1

default allow := false

allow if input.parsed_path[0] == "public"

allow if {
    input.parsed_path[0] == "orders"
    input.identity.user.sub == "alice"
}

allow := {"allowed": false, "http_status": 429, "body": "slow down", "headers": {"x-reason": "busy"}} if {
    input.parsed_path[0] == "busy"
}
"""


def write_audit_policy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.rego").write_text(AUDIT_POLICY)
    return folder


def workload(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{name}"


def check_request_json(path: str, *, principal: str = "", method: str = "GET",
                       headers: dict[str, str] | None = None, request_id: str = "", body: str = "") -> dict[str, Any]:
    http: dict[str, Any] = {"method": method, "path": path, "host": "orders", "scheme": "http",
                            "protocol": "HTTP/1.1",
                            "headers": {":authority": "orders", ":method": method, ":path": path,
                                        **(headers or {})}}
    if body:
        http["body"] = body
    if request_id:
        http["id"] = request_id
    attributes: dict[str, Any] = {
        "source": {"address": {"socketAddress": {"address": "10.0.0.7", "portValue": 41000}}},
        "destination": {"address": {"socketAddress": {"address": "10.0.0.8", "portValue": 8000}}},
        "request": {"http": http},
    }
    if principal:
        attributes["source"]["principal"] = principal
    return {"attributes": attributes}


def facts_for(path: str, **kwargs: Any) -> Facts:
    return facts_from_check_request(check_request_from_json(check_request_json(path, **kwargs)))


def check_request_bytes(path: str, **kwargs: Any) -> bytes:
    return check_request_from_json(check_request_json(path, **kwargs)).SerializeToString()


def a_jwt(sub: str = "mallory", **claims: Any) -> str:
    return jwt.encode({"sub": sub, "iat": int(time.time()), **claims}, "k" * 32, algorithm="HS256")


async def open_session(store: Any, *, subject: str, spiffe_id: str, now: float) -> str:
    """A live session in ``store`` bound to ``spiffe_id``; returns its (secret) id."""
    session_id = new_session_id()
    await store.create(Session(key=session_key(session_id), subject=subject, issuer="https://idp.test",
                               claims={"sub": subject}, created=now, expires=now + 3600, idle_timeout=900,
                               binding=Binding(spiffe_id=spiffe_id), generation=0), now=now)
    return session_id


def secret_headers(session_id: str) -> tuple[dict[str, str], list[str]]:
    """Request headers carrying credentials in every place we redact, and the secrets in them."""
    bearer = a_jwt("bob")
    odd_jwt = a_jwt("eve", scope="admin")
    opaque = "opaque-" + uuid.uuid4().hex
    cookie_secret = "c00k1e-" + uuid.uuid4().hex
    api_key = "key-" + uuid.uuid4().hex
    headers = {
        "authorization": f"Bearer {bearer}",
        "proxy-authorization": "Basic " + base64.b64encode(b"proxyuser:proxy-pass-123").decode(),
        "x-session-id": session_id,
        "cookie": f"theme=dark; __Host-authz-session={session_id}; csrf={cookie_secret}",
        "set-cookie": f"sid={cookie_secret}; Path=/; HttpOnly",
        "x-forwarded-jwt": odd_jwt,
        "x-upstream-auth": f"Bearer {opaque}",
        "x-api-key": api_key,
        "referer": f"https://app.test/cb?state=1&id_token={odd_jwt}",
    }
    secrets = [bearer, odd_jwt, opaque, cookie_secret, api_key, session_id,
               base64.b64encode(b"proxyuser:proxy-pass-123").decode()]
    return headers, secrets


def secret_path(base: str) -> tuple[str, list[str]]:
    access, refresh = "at-" + uuid.uuid4().hex, "rt-" + uuid.uuid4().hex
    return f"{base}?access_token={access}&page=2&refresh_token={refresh}&session=s-{access}", [access, refresh]


def assert_no_secret(text: str, secrets: list[str], where: str = "the audit output") -> None:
    for secret in secrets:
        assert secret not in text, f"secret {secret[:12]}... survived in {where}"
    for fragment in [s for s in secrets if s.startswith("ey")]:
        header = fragment.split(".")[0]
        assert header not in text, f"a JWT header survived in {where}"


def jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text().splitlines():
        yield json.loads(line)


def unique_table() -> str:
    return f"audit_test_{uuid.uuid4().hex[:12]}"


async def eventually(check: Any, *, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``check()`` holds, looking again each event-loop tick or so."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.01)


def grpc_check(channel: Any) -> Any:
    """The ext_authz Check method on ``channel``, sending serialized CheckRequests."""
    from envoy.service.auth.v3 import external_auth_pb2

    return channel.unary_unary("/envoy.service.auth.v3.Authorization/Check", request_serializer=None,
                               response_deserializer=external_auth_pb2.CheckResponse.FromString)


def drop_table(url: str) -> None:
    import psycopg

    from authz_server.audit.sinks.postgres import split_url

    conninfo, table = split_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table[-1]}"')


def postgres_table() -> Any:
    """A PostgreSQL audit sink URL with a table of its own on the test run's private server
    (started on first use), dropped afterwards (a fixture body)."""
    import contextlib

    from tests.support.postgres import postgres_url

    @contextlib.contextmanager
    def scope() -> Iterator[str]:
        url = f"{postgres_url()}?table={unique_table()}"
        try:
            yield url
        finally:
            drop_table(url)

    return scope()
