"""authz-server against a real, certified OpenID provider (oidc-provider), through real Envoy:
discovery and JWT access tokens, key rotation, refresh tokens, opaque tokens by introspection
(plain and RFC 9701 signed answers) with revocation and the provider down, DPoP-bound tokens,
certificate-bound tokens. Every token comes from the provider; none is made here."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import urllib.parse
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import jwt
import pytest

from authz_server.config import Config, SessionsConfig
from authz_server.devidp.config import DevIdPConfig
from authz_server.devidp.provider import DevIdP
from authz_server.identity.oidc import IssuerConfig
from authz_server.identity.resolver import SessionSettings
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, render_front_proxy
from authz_server.mesh.oidcprovider import OidcProvider
from authz_server.mesh.upstream import serve_echo
from authz_server.server import App
from tests.support.authz import running_app, write_policy
from authz_server.mesh.browser import ScriptedBrowser
from tests.support.dpop import DpopClient
from tests.support.oidc import LEDGER, ORDERS, needs_oidc_provider, start_provider

pytestmark = pytest.mark.e2e
OIDC_PROVIDER = needs_oidc_provider()

POLICY = """
package envoy.authz
import rego.v1

default allow := false

allow if input.identity.user.sub in {"shop", "alice", "bound"}
"""


@contextlib.asynccontextmanager
async def stack_for(supervisor: Any, tmp_path: Path, *, issuer: dict[str, Any] | None = None,
                mode: str = "grpc") -> AsyncIterator[tuple[App, OidcProvider, dict[str, str], str]]:
    provider, client_secrets = start_provider(supervisor, tmp_path / "op")
    (tmp_path / "introspection-secret").write_text(client_secrets["authz-server"])
    write_policy(tmp_path / "policies", POLICY)
    upstream, upstream_addr = await serve_echo("127.0.0.1:0", "orders")
    settings = {"issuer": provider.issuer, "audiences": ["orders", "ledger"],
                "introspection": {"client_id": "authz-server",
                                  "client_secret_file": str(tmp_path / "introspection-secret"),
                                  "jwt_response": "never", "cache_ttl": "30s"},
                "dpop": "allowed", **(issuer or {})}
    config = Config(policies=str(tmp_path / "policies"), metrics_addr="", addr="127.0.0.1:0",
                    http_addr="127.0.0.1:0", issuers=(IssuerConfig.from_mapping(settings, "issuers[0]"),),
                    sessions=SessionsConfig(settings=SessionSettings(idle_timeout=600, max_lifetime=3600)))
    try:
        async with running_app(config) as app:
            address = app.bound["addr" if mode == "grpc" else "http_addr"]
            envoy = start_envoy(supervisor, f"front-{mode}", render_front_proxy(FrontProxy(
                upstream=upstream_addr, authz=AuthzTarget(address, mode=mode))))
            yield app, provider, client_secrets, f"http://127.0.0.1:{envoy.port('ingress')}"
    finally:
        upstream.close()


async def client_credentials(provider: OidcProvider, client: str, secret: str, *, resource: str = ORDERS,
                             scope: str = "orders:read", headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(provider.metadata()["token_endpoint"], auth=(client, secret), headers=headers,
                                   data={"grant_type": "client_credentials", "resource": resource, "scope": scope})
    assert response.status_code == 200, response.text
    return response.json()


@contextlib.asynccontextmanager
async def dev_idp_stack(supervisor: Any, tmp_path: Path, issuer: dict[str, Any]
                        ) -> AsyncIterator[tuple[App, Any, str]]:
    """The same stack with the dev IdP (offline demo) in place of oidc-provider."""
    idp = DevIdP(DevIdPConfig.from_mapping({
        "addr": "127.0.0.1:0", "algorithms": ["ES256"], "key_rotation": "1h", "key_publish_ahead": "1s",
        "clients": [{"client_id": "shop", "client_secret": "shop-secret", "grants": ["client_credentials"],
                     "audiences": ["orders"], "scopes": ["orders:read"]}]}))
    await idp.start()
    write_policy(tmp_path / "policies", POLICY)
    upstream, upstream_addr = await serve_echo("127.0.0.1:0", "orders")
    config = Config(policies=str(tmp_path / "policies"), metrics_addr="", addr="127.0.0.1:0",
                    issuers=(IssuerConfig.from_mapping({"issuer": idp.issuer, "audiences": ["orders"], **issuer},
                                                       "issuers[0]"),))
    try:
        async with running_app(config) as app:
            envoy = start_envoy(supervisor, "front-grpc", render_front_proxy(FrontProxy(
                upstream=upstream_addr, authz=AuthzTarget(app.bound["addr"]))))
            yield app, idp, f"http://127.0.0.1:{envoy.port('ingress')}"
    finally:
        upstream.close()
        await idp.stop()


@pytest.mark.parametrize("idp,mode", [pytest.param("oidc-provider", "grpc", marks=OIDC_PROVIDER),
                                      pytest.param("oidc-provider", "http", marks=OIDC_PROVIDER), ("devidp", "grpc")])
async def test_jwt_access_tokens_discovery_and_key_rotation(supervisor, tmp_path: Path, idp: str, mode: str) -> None:
    """The interop checks the dev IdP passes as well, for what it claims: discovery, JWT access
    tokens by client credentials, a key rotation."""
    # A kid never seen may ask for a refresh every second (default 30 s: a flood of made-up kids
    # costs the provider little); the new key signs only after that.
    refresh = {"refresh": {"unknown_kid_interval": "1s"}}
    async with contextlib.AsyncExitStack() as stack:
        if idp == "oidc-provider":
            app, provider, client_secrets, front = await stack.enter_async_context(
                stack_for(supervisor, tmp_path, issuer=refresh, mode=mode))

            async def token() -> str:
                return (await client_credentials(provider, "shop", client_secrets["shop"]))["access_token"]

            def rotate() -> str:
                return provider.rotate_keys("ES256")
        else:
            app, dev, front = await stack.enter_async_context(dev_idp_stack(supervisor, tmp_path, refresh))

            async def token() -> str:
                async with httpx.AsyncClient(timeout=10) as http:
                    answer = await http.post(f"{dev.issuer}/token", auth=("shop", "shop-secret"),
                                             data={"grant_type": "client_credentials", "scope": "orders:read"})
                return answer.json()["access_token"]

            def rotate() -> str:
                return dev.rotate_keys()[0]

        first = await token()
        assert jwt.get_unverified_header(first)["typ"] == "at+jwt"
        async with httpx.AsyncClient(base_url=front, timeout=10) as http:
            ok = await http.get("/orders/1", headers={"authorization": f"Bearer {first}"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["headers"]["x-authz-subject"] == "shop"
            assert "authorization" not in ok.json()["headers"]

            new_kid = rotate()
            await asyncio.sleep(1.1)  # the unknown-kid interval (and the dev IdP's publish-ahead) pass
            rotated = await token()
            assert jwt.get_unverified_header(rotated)["kid"] == new_kid
            again = await http.get("/orders/2", headers={"authorization": f"Bearer {rotated}"})
            assert again.status_code == 200, again.text
            status = app.identity.tokens.status()[0]
            assert new_kid in status.kids

            forged = rotated[:-4] + ("AAAA" if not rotated.endswith("AAAA") else "BBBB")
            assert (await http.get("/orders/3", headers={"authorization": f"Bearer {forged}"})).status_code == 401


@OIDC_PROVIDER
async def test_refresh_tokens_from_the_code_flow(supervisor, tmp_path: Path) -> None:
    async with stack_for(supervisor, tmp_path) as (app, provider, client_secrets, front):
        metadata = provider.metadata()
        verifier = secrets.token_urlsafe(48)
        challenge = jwt.utils.base64url_encode(hashlib.sha256(verifier.encode()).digest()).decode()
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": "shop", "redirect_uri": "https://shop.test/cb",
            "scope": "openid offline_access orders:read", "state": "s1", "nonce": "n1", "prompt": "consent",
            "code_challenge": challenge, "code_challenge_method": "S256", "resource": ORDERS})
        browser = ScriptedBrowser(httpx.AsyncClient(follow_redirects=False, timeout=10))
        try:
            page = await browser.go(f"{metadata['authorization_endpoint']}?{query}")
            back = await browser.sign_in(page, "alice", "wonderland", stop_before="https://shop.test/")
        finally:
            await browser.close()
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(back.headers["location"]).query)["code"][0]
        auth = ("shop", client_secrets["shop"])
        async with httpx.AsyncClient(timeout=10) as http:
            first = (await http.post(metadata["token_endpoint"], auth=auth, data={
                "grant_type": "authorization_code", "code": code, "redirect_uri": "https://shop.test/cb",
                "code_verifier": verifier})).json()
            assert "refresh_token" in first, first
            refreshed = (await http.post(metadata["token_endpoint"], auth=auth, data={
                "grant_type": "refresh_token", "refresh_token": first["refresh_token"], "resource": ORDERS})).json()
            assert refreshed["access_token"] != first["access_token"]
            # The code is single use: the provider refuses it a second time (and revokes what it gave).
            reused = await http.post(metadata["token_endpoint"], auth=auth, data={
                "grant_type": "authorization_code", "code": code, "redirect_uri": "https://shop.test/cb",
                "code_verifier": verifier})
            assert reused.status_code == 400
        async with httpx.AsyncClient(base_url=front, timeout=10) as http:
            ok = await http.get("/orders", headers={"authorization": f"Bearer {refreshed['access_token']}"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["headers"]["x-authz-subject"] == "alice"


@OIDC_PROVIDER
@pytest.mark.parametrize("answers", ["json", "jwt"])
async def test_opaque_tokens_by_introspection_revocation_and_the_provider_down(
        supervisor, tmp_path: Path, answers: str) -> None:
    introspection = {"jwt_response": "always" if answers == "jwt" else "never", "cache_ttl": "30s"}
    async with stack_for(supervisor, tmp_path, issuer={"introspection": {
            "client_id": "authz-server", "client_secret_file": str(tmp_path / "introspection-secret"),
            **introspection}}) as (app, provider, client_secrets, front):
        issued = await client_credentials(provider, "shop", client_secrets["shop"], resource=LEDGER,
                                          scope="ledger:read")
        opaque = issued["access_token"]
        assert opaque.count(".") == 0  # not a JWT: only the provider can say what it is
        introspector = app.identity.tokens._issuers[provider.issuer].introspector
        async with httpx.AsyncClient(base_url=front, timeout=10) as http:
            ok = await http.get("/ledger", headers={"authorization": f"Bearer {opaque}"})
            assert ok.status_code == 200, ok.text
            session = ok.headers["x-session-id"]
            for _ in range(3):  # cached by digest: the provider is asked once
                assert (await http.get("/ledger", headers={"authorization": f"Bearer {opaque}"})).status_code == 200
            assert introspector.requests == 1 and introspector.hits == 3

            # Revoked at the provider: once the cached answer is gone, the token is inactive.
            async with httpx.AsyncClient(timeout=10) as direct:
                revoked = await direct.post(provider.metadata()["revocation_endpoint"], data={"token": opaque},
                                            auth=("shop", client_secrets["shop"]))
                assert revoked.status_code == 200
            introspector._cache.clear()
            gone = await http.get("/ledger", headers={"authorization": f"Bearer {opaque}"})
            assert gone.status_code == 401 and gone.json()["error"] == "token_inactive"
            assert (await http.get("/ledger", headers={"x-session-id": session})).status_code == 200

            # The provider down: a token never seen fails closed (503); a cached one still answers.
            fresh = (await client_credentials(provider, "shop", client_secrets["shop"], resource=LEDGER,
                                              scope="ledger:read"))["access_token"]
            assert (await http.get("/ledger", headers={"authorization": f"Bearer {fresh}"})).status_code == 200
            provider.stop()
            unknown = "x" * 43
            down = await http.get("/ledger", headers={"authorization": f"Bearer {unknown}"})
            assert down.status_code == 503 and down.json()["error"] == "introspection_unavailable"
            cached = await http.get("/ledger", headers={"authorization": f"Bearer {fresh}"})
            assert cached.status_code == 200


@OIDC_PROVIDER
async def test_dpop_bound_tokens_and_sessions(supervisor, tmp_path: Path) -> None:
    async with stack_for(supervisor, tmp_path) as (app, provider, client_secrets, front):
        client = DpopClient()
        endpoint = provider.metadata()["token_endpoint"]
        issued = await client_credentials(provider, "shop", client_secrets["shop"],
                                          headers={"dpop": client.proof("POST", endpoint)})
        assert issued["token_type"] == "DPoP"
        token = issued["access_token"]
        assert jwt.decode(token, options={"verify_signature": False})["cnf"] == {"jkt": client.jkt}
        url = f"{front}/orders/7"
        async with httpx.AsyncClient(timeout=10) as http:
            proof = client.proof("GET", url, token=token)
            ok = await http.get(url, headers={"authorization": f"DPoP {token}", "dpop": proof})
            assert ok.status_code == 200, ok.text
            session = ok.headers["x-session-id"]

            replay = await http.get(url, headers={"authorization": f"DPoP {token}", "dpop": proof})
            assert replay.status_code == 401 and replay.json()["error"] == "dpop_replay"
            assert replay.headers["www-authenticate"].startswith("DPoP ")
            stolen = await http.get(url, headers={"authorization": f"Bearer {token}"})
            assert stolen.status_code == 401 and stolen.json()["error"] == "dpop_required"
            thief = DpopClient()
            other_key = await http.get(url, headers={"authorization": f"DPoP {token}",
                                                     "dpop": thief.proof("GET", url, token=token)})
            assert other_key.status_code == 401 and other_key.json()["error"] == "dpop_key_mismatch"

            # The session made from the bound token stays bound: each call proves possession again.
            by_session = await http.get(url, headers={"x-session-id": session, "dpop": client.proof("GET", url)})
            assert by_session.status_code == 200
            without = await http.get(url, headers={"x-session-id": session})
            assert without.status_code == 401 and without.json()["error"] == "dpop_required"


@OIDC_PROVIDER
async def test_certificate_bound_tokens_need_the_certificate(supervisor, tmp_path: Path) -> None:
    from authz_server.identity.tokens import cert_thumbprint
    from tests.support.pki import ScratchCA

    async with stack_for(supervisor, tmp_path) as (app, provider, client_secrets, front):
        leaf = ScratchCA.create().issue("spiffe://example.org/bound-client")
        issued = await client_credentials(provider, "bound", client_secrets["bound"], headers={
            "x-client-cert": urllib.parse.quote(leaf.cert_pem.decode())})
        claims = jwt.decode(issued["access_token"], options={"verify_signature": False})
        assert claims["cnf"] == {"x5t#S256": cert_thumbprint(leaf.der)}
        async with httpx.AsyncClient(base_url=front, timeout=10) as http:
            # Over plain HTTP no client certificate reaches the check: the bound token is refused.
            refused = await http.get("/orders", headers={"authorization": f"Bearer {issued['access_token']}"})
            assert refused.status_code == 401 and refused.json()["error"] == "cnf_mismatch"
