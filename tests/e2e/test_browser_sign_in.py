"""Browser sign-in through real Envoy, against a real OpenID provider (oidc-provider), with a
scripted browser: the code flow with PKCE, the session cookie, logout, and the CSRF defences
(state, replay, nonce/PKCE of another sign-in). Both ext_authz modes."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import parse_qs, urlsplit

import pytest

from authz_server.config import Config
from authz_server.identity.browser import BrowserLoginConfig
from authz_server.identity.oidc import IssuerConfig
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy
from authz_server.mesh.processes import free_port
from authz_server.mesh.upstream import serve_echo
from authz_server.server import App
from tests.support.authz import running_app, write_policy
from authz_server.mesh.browser import ScriptedBrowser
from tests.support.oidc import needs_oidc_provider, start_provider
from tests.support.pki import ScratchCA

pytestmark = [pytest.mark.e2e, needs_oidc_provider()]

POLICY = """
package envoy.authz
import rego.v1

default allow := false

allow if input.identity.user.sub == "alice"
"""


@contextlib.asynccontextmanager
async def site(supervisor: Any, tmp_path: Path, mode: str) -> AsyncIterator[tuple[App, str, Any, str]]:
    """Envoy on https://127.0.0.1:PORT in front of an echo service, every route a browser route,
    authz-server signing browsers in at oidc-provider."""
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    provider, secrets = start_provider(supervisor, tmp_path / "op", redirect_origins=(origin,))
    (tmp_path / "client-secret").write_text(secrets["authz-server"])
    write_policy(tmp_path / "policies", POLICY)
    ca = ScratchCA.create()
    cert, key, ca_file = ca.write(tmp_path / "tls", "front", ca.issue("spiffe://example.org/front"))
    upstream, upstream_addr = await serve_echo("127.0.0.1:0", "shop")
    config = Config(
        policies=str(tmp_path / "policies"), metrics_addr="", addr="127.0.0.1:0", http_addr="127.0.0.1:0",
        issuers=(IssuerConfig.from_mapping({"issuer": provider.issuer, "audiences": ["orders"]}, "issuers[0]"),),
        browser_login=BrowserLoginConfig.from_mapping({
            "issuer": provider.issuer, "client_id": "authz-server",
            "client_secret_file": str(tmp_path / "client-secret")}),
    )
    try:
        async with running_app(config) as app:
            address = app.bound["addr" if mode == "grpc" else "http_addr"]
            target = AuthzTarget(address, mode=mode, http_headers_to_add=(("x-authz-ctx-browser", "true"),)
                                 if mode == "http" else ())
            start_envoy(supervisor, f"front-{mode}", render_front_proxy(FrontProxy(
                upstream=upstream_addr, listen=f"127.0.0.1:{port}", authz=target,
                routes=(Route("/", {"browser": "true"}),), tls=(str(cert), str(key)))))
            yield app, origin, provider, str(ca_file)
    finally:
        upstream.close()


async def sign_in(browser: ScriptedBrowser, origin: str, user: str = "alice",
                  password: str = "wonderland") -> tuple[Any, int]:
    """Ask for a page, sign in at the provider; returns the final page and the round trips
    from the provider's answer to the login form onwards."""
    login_page = await browser.go(f"{origin}/account?tab=orders")
    assert login_page.status_code == 200 and "<form" in login_page.text, login_page.text[:300]
    before = len(browser.visits)
    page = await browser.sign_in(login_page, user, password)
    after_login = browser.visits[before:]
    # Round trips from the provider's redirect back to us (the callback) to the page.
    first_ours = next(i for i, (_, url, _) in enumerate(after_login) if url.startswith(origin))
    return page, len(after_login) - first_ours


@pytest.mark.parametrize("mode", ["grpc", "http"])
async def test_sign_in_at_the_provider_then_the_cookie_then_logout(supervisor, tmp_path: Path, mode: str) -> None:
    async with site(supervisor, tmp_path, mode) as (app, origin, provider, ca_file):
        browser = ScriptedBrowser.open(ca_file)
        try:
            first = await browser.request("GET", f"{origin}/account?tab=orders")
            assert first.status_code == 302
            to_provider = urlsplit(first.headers["location"])
            assert to_provider.netloc == urlsplit(provider.issuer).netloc
            query = parse_qs(to_provider.query)
            assert query["response_type"] == ["code"] and query["code_challenge_method"] == ["S256"]
            assert query["state"][0] and query["nonce"][0] and query["redirect_uri"] == [f"{origin}/_authz/callback"]
            assert "Secure" in first.headers["set-cookie"] and "HttpOnly" in first.headers["set-cookie"]

            page, round_trips = await sign_in(browser, origin)
            assert page.status_code == 200, page.text[:300]
            assert round_trips <= 3  # callback, then the page itself
            seen = page.json()
            assert seen["path"] == "/account?tab=orders"  # back where the user started
            assert seen["headers"]["x-authz-subject"] == "alice"
            session = browser.cookie("__Host-authz-session")
            assert session and len(session) == 43
            callback = next(v for v in browser.visits if "/_authz/callback" in v[1])
            assert callback[2] == 302

            validated, lookups = app.identity.stats.tokens_validated, app.identity.stats.session_lookups
            for n in range(5):
                again = await browser.request("GET", f"{origin}/orders/{n}")
                assert again.status_code == 200 and again.json()["headers"]["x-authz-subject"] == "alice"
            assert app.identity.stats.tokens_validated == validated  # later calls: a session lookup, no crypto
            assert app.identity.stats.session_lookups >= lookups + 5

            out = await browser.request("GET", f"{origin}/_authz/logout")
            assert out.status_code == 302
            assert out.headers["location"].startswith(provider.metadata()["end_session_endpoint"])
            assert browser.cookie("__Host-authz-session") is None  # cleared in the browser
            # ... and ended on the server: the old cookie, replayed, leads back to the provider.
            browser.client.cookies.set("__Host-authz-session", session, domain="127.0.0.1", path="/")
            assert (await browser.request("GET", f"{origin}/account")).status_code == 302
        finally:
            await browser.close()


async def test_csrf_state_replay_and_a_code_from_another_sign_in_are_refused(supervisor, tmp_path: Path) -> None:
    async with site(supervisor, tmp_path, "grpc") as (app, origin, provider, ca_file):
        victim, attacker, replayer = (ScriptedBrowser.open(ca_file) for _ in range(3))
        try:
            # The attacker signs in as themself and stops at the callback (a code and a state).
            login_page = await attacker.go(f"{origin}/account")
            stopped = await attacker.sign_in(login_page, "mallory", "mallory-pw", stop_before=origin)
            attacker_callback = stopped.headers["location"]
            assert attacker_callback.startswith(f"{origin}/_authz/callback?") and "code=" in attacker_callback

            # 1. Login CSRF: the victim's browser is made to load the attacker's callback.
            forced = await victim.request("GET", attacker_callback)
            assert forced.status_code == 401 and "login_state_mismatch" in forced.text

            # 2. Code injection: the victim has a sign-in of their own under way; the attacker's
            #    code arrives with the victim's state and pre-auth cookie. Its PKCE check fails at
            #    the provider (and its nonce is not the victim's).
            started = await victim.request("GET", f"{origin}/account")
            victim_state = parse_qs(urlsplit(started.headers["location"]).query)["state"][0]
            code = parse_qs(urlsplit(attacker_callback).query)["code"][0]
            injected = await victim.request(
                "GET", f"{origin}/_authz/callback?code={code}&state={victim_state}&iss={provider.issuer}")
            assert injected.status_code == 401
            assert "login_failed" in injected.text or "nonce_mismatch" in injected.text
            assert victim.cookie("__Host-authz-session") is None

            # 3. Replay: a completed callback sent again, with the pre-auth cookie copied before.
            started = await victim.request("GET", f"{origin}/account")
            copied = victim.pre_auth_cookies()
            page = await victim.sign_in(await victim.go(started.headers["location"]), "alice", "wonderland")
            assert page.status_code == 200 and page.json()["headers"]["x-authz-subject"] == "alice"
            callback = next(url for _, url, status in victim.visits if "/_authz/callback" in url and status == 302)
            for name, value in copied:
                replayer.client.cookies.set(name, value, domain="127.0.0.1", path="/")
            replayed = await replayer.request("GET", callback)
            assert replayed.status_code == 401 and "login_replayed" in replayed.text
            assert replayer.cookie("__Host-authz-session") is None
            assert app.identity.browser.refused >= 3
        finally:
            for browser in (victim, attacker, replayer):
                await browser.close()
