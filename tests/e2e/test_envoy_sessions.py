"""Through real Envoy: sign in once with a JWT, then the session id alone, then revocation."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from authz_server.config import Config
from authz_server.devidp.config import DevIdPConfig
from authz_server.devidp.provider import DevIdP
from authz_server.identity.oidc import IssuerConfig
from authz_server.identity.sessions import session_key
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, render_front_proxy
from authz_server.mesh.upstream import serve_echo
from tests.support.authz import running_app, write_policy

pytestmark = pytest.mark.e2e

POLICY = 'package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.identity.user.sub == "alice"\n'
IDP = {"users": [{"username": "alice", "password": "pw", "subject": "alice"}],
       "clients": [{"client_id": "shop", "client_secret": "s", "grants": ["password"], "audiences": ["orders"]}]}


@pytest.mark.parametrize("mode", ["grpc", "http"])
async def test_sign_in_once_then_session_only_then_revoked(supervisor, tmp_path: Path, mode: str) -> None:
    write_policy(tmp_path / "policies", POLICY)
    upstream, upstream_addr = await serve_echo("127.0.0.1:0", "orders")
    async with DevIdP(DevIdPConfig.from_mapping({**IDP, "addr": "127.0.0.1:0"})) as idp:
        config = Config(policies=str(tmp_path / "policies"), metrics_addr="", addr="127.0.0.1:0",
                        http_addr="127.0.0.1:0",
                        issuers=(IssuerConfig.from_mapping({"issuer": idp.issuer, "audiences": ["orders"]},
                                                           "issuers[0]"),))
        try:
            async with running_app(config) as app:
                address = app.bound["addr" if mode == "grpc" else "http_addr"]
                envoy = start_envoy(supervisor, f"front-{mode}", render_front_proxy(FrontProxy(
                    upstream=upstream_addr, authz=AuthzTarget(address, mode=mode))))
                token = idp.issue("shop", username="alice").access_token
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port('ingress')}", timeout=5) as c:
                    first = await c.get("/orders", headers={"authorization": f"Bearer {token}"})
                    assert first.status_code == 200, first.text
                    session = first.headers["x-session-id"]
                    seen = first.json()["headers"]
                    assert "authorization" not in seen  # the service never sees the user's token
                    assert seen["x-authz-subject"] == "alice"

                    validated = app.identity.stats.tokens_validated
                    for _ in range(10):
                        again = await c.get("/orders", headers={"x-session-id": session})
                        assert again.status_code == 200
                        assert again.json()["headers"]["x-authz-subject"] == "alice"
                    assert app.identity.stats.tokens_validated == validated  # no JWT work after sign-in

                    assert await app.identity.store.revoke(session_key(session), now=time.time())
                    gone = await c.get("/orders", headers={"x-session-id": session})
                    assert gone.status_code == 401
                    assert gone.json()["error"] == "session_revoked"
                    assert gone.headers["www-authenticate"].startswith("Bearer")
        finally:
            upstream.close()
