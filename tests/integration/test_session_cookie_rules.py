"""The session cookie's rules (issue 23, item 5), on both fronts: it counts only on browser
routes (``browser: "true"``) and never outranks a bearer token. Tokens come from the dev
OIDC provider, sessions from authz-server itself: nothing here is hand-made."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server.config import Config
from authz_server.devidp.config import DevIdPConfig
from authz_server.devidp.provider import DevIdP
from authz_server.identity.oidc import IssuerConfig
from authz_server.identity.sessions import new_session_id
from authz_server.server import App
from tests.support.authz import running_app, write_policy

POLICY = """
package envoy.authz
import rego.v1

default allow := false

allow if input.identity.user.sub != ""
"""
IDP = {"users": [{"username": "alice", "password": "pw"}, {"username": "mallory", "password": "pw"}],
       "clients": [{"client_id": "shop", "client_secret": "s", "grants": ["password"], "audiences": ["orders"]}]}
COOKIE = "__Host-authz-session"


@contextlib.asynccontextmanager
async def stack(tmp_path: Path) -> AsyncIterator[tuple[App, DevIdP]]:
    write_policy(tmp_path / "policies", POLICY)
    async with DevIdP(DevIdPConfig.from_mapping({**IDP, "addr": "127.0.0.1:0"})) as idp:
        config = Config(policies=str(tmp_path / "policies"), metrics_addr="", addr="127.0.0.1:0",
                        http_addr="127.0.0.1:0",
                        issuers=(IssuerConfig.from_mapping({"issuer": idp.issuer, "audiences": ["orders"]},
                                                           "issuers[0]"),))
        async with running_app(config) as app:
            yield app, idp


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: str) -> None:
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    @property
    def session_cookie(self) -> str | None:
        value = self.header("set-cookie")
        if value is None or not value.startswith(f"{COOKIE}="):
            return None
        return value.split(";", 1)[0].split("=", 1)[1]


async def ask(app: App, front: str, *, browser: bool, token: str | None = None,
              cookie: str | None = None) -> Answer:
    headers = {"user-agent": "browser/1"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if cookie:
        headers["cookie"] = f"theme=dark; {COOKIE}={cookie}"
    if front == "grpc":
        check = external_auth_pb2.CheckRequest()
        http = check.attributes.request.http
        http.method, http.path, http.host = "GET", "/account", "shop"
        http.headers.update(headers)
        check.attributes.source.address.socket_address.address = "10.0.0.9"
        if browser:
            check.attributes.context_extensions["browser"] = "true"
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            response = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check)
        if response.status.code == 0:
            return Answer(200, [(o.header.key, o.header.value) for o in response.ok_response.response_headers_to_add],
                          "")
        denied = response.denied_response
        return Answer(denied.status.code, [(o.header.key, o.header.value) for o in denied.headers], denied.body)
    if browser:
        headers["x-authz-ctx-browser"] = "true"
    headers["x-forwarded-for"] = "10.0.0.9"
    async with httpx.AsyncClient(base_url=f"http://{app.bound['http_addr']}", timeout=5) as client:
        reply = await client.get("/check/account", headers=headers)
    return Answer(reply.status_code, list(reply.headers.multi_items()), reply.text)


async def browser_session(app: App, idp: DevIdP, front: str, user: str) -> str:
    """A session as a browser gets one: a token once, the cookie back."""
    answer = await ask(app, front, browser=True, token=idp.issue("shop", username=user).access_token)
    assert answer.status == 200, answer.body
    assert answer.session_cookie
    return answer.session_cookie


FRONTS = pytest.mark.parametrize("front", ["grpc", "http"])


@FRONTS
async def test_the_cookie_is_a_credential_on_browser_routes_only(tmp_path: Path, front: str) -> None:
    async with stack(tmp_path) as (app, idp):
        cookie = await browser_session(app, idp, front, "alice")
        assert (await ask(app, front, browser=True, cookie=cookie)).status == 200
        elsewhere = await ask(app, front, browser=False, cookie=cookie)
        assert elsewhere.status == 403  # anonymous there: the policy refuses, the cookie was not used
        assert '"policy_denied"' in elsewhere.body or elsewhere.body == ""


@FRONTS
async def test_a_planted_cookie_never_beats_the_victims_token(tmp_path: Path, front: str) -> None:
    async with stack(tmp_path) as (app, idp):
        planted = await browser_session(app, idp, front, "mallory")
        victim_token = idp.issue("shop", username="alice").access_token
        answer = await ask(app, front, browser=True, token=victim_token, cookie=planted)
        assert answer.status == 200, answer.body
        fresh = answer.session_cookie
        assert fresh and fresh != planted  # a fresh session replaces the planted one: no fixation
        assert answer.header("x-session-id") == fresh
        # The fresh session is alice's own; mallory's is left as it was (hers, not alice's).
        assert (await ask(app, front, browser=True, cookie=fresh)).status == 200
        sessions = {s.subject for s in await app.identity.store.sessions(now=time.time())}
        assert sessions == {"alice", "mallory"}


@FRONTS
async def test_a_stale_cookie_with_a_valid_token_signs_the_user_in_again(tmp_path: Path, front: str) -> None:
    async with stack(tmp_path) as (app, idp):
        stale = new_session_id()  # expired, revoked or from before a restart: unknown here
        alone = await ask(app, front, browser=True, cookie=stale)
        assert alone.status == 401 and "session_unknown" in alone.body
        token = idp.issue("shop", username="alice").access_token
        answer = await ask(app, front, browser=True, token=token, cookie=stale)
        assert answer.status == 200, answer.body
        assert answer.session_cookie and answer.session_cookie != stale
        set_cookie = answer.header("set-cookie") or ""
        for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax"):
            assert attribute in set_cookie
