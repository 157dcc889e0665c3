"""``authz-server demo --idp oidc-provider``: people and clients as they really arrive, against a
real OpenID provider (oidc-provider on Node.js).

Brings up oidc-provider, authz-server and one Envoy (https, a self-signed certificate made
here) in front of a small upstream, then tours: a browser is sent to sign in, signs in
(code flow + PKCE), gets its session cookie and uses it; an API client gets a DPoP-bound
token and proves possession, and a replayed proof is refused; an opaque token is checked by
introspection; the browser signs out. Needs Node.js and ``make install`` (npm ci).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import secrets
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import httpx
import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .browser import ScriptedBrowser
from .envoy import start_envoy
from .extauthz import AuthzTarget
from .front import FrontProxy, Route, render_front_proxy
from .oidcprovider import OidcProvider, unavailable_reason
from .processes import Supervisor, free_port, tcp_ready, wait_until
from .tour import Outcome, Step, TourResult, expect_status, run_tour

POLICY = """package envoy.authz
import rego.v1

default allow := false

# People signed in through the browser: their pages.
allow if {
    input.attributes.contextExtensions.browser == "true"
    input.identity.user.sub == "alice"
}

# API clients: a DPoP-bound token (or its session), or an opaque token the provider vouched for.
allow if {
    input.parsed_path[0] == "api"
    input.identity.user.cnf.jkt != ""
}

allow if {
    input.parsed_path[0] == "api"
    input.identity.user.claims.aud == "ledger"
}
"""
ORDERS, LEDGER = "urn:demo:orders", "urn:demo:ledger"


@dataclass
class SignInDemo:
    origin: str  # https://127.0.0.1:PORT (Envoy)
    ca_file: str
    provider: OidcProvider
    shop_secret: str


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (the demo's https listener), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authz-server demo")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "front.pem", folder / "front.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def start(supervisor: Supervisor, workdir: Path) -> SignInDemo:
    port = free_port()
    origin = f"https://127.0.0.1:{port}"
    client_secret, shop_secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    common = {"token_endpoint_auth_method": "client_secret_basic"}
    provider = OidcProvider(
        supervisor, workdir / "oidc-provider",
        clients=[{"client_id": "authz-server", "client_secret": client_secret, "response_types": ["code"],
                  "grant_types": ["authorization_code", "refresh_token"],
                  "redirect_uris": [f"{origin}/_authz/callback"], "post_logout_redirect_uris": [f"{origin}/"],
                  **common},
                 {"client_id": "shop", "client_secret": shop_secret, "grant_types": ["client_credentials"],
                  "response_types": [], "redirect_uris": [], **common}],
        accounts={"alice": {"password": "wonderland", "claims": {"name": "Alice", "roles": ["buyer"]}}},
        resources={ORDERS: {"audience": "orders", "scope": "orders:read", "format": "jwt"},
                   LEDGER: {"audience": "ledger", "scope": "ledger:read", "format": "opaque"}},
        default_resource=ORDERS)
    provider.start()
    secret_file = workdir / "client-secret"
    secret_file.write_text(client_secret)
    secret_file.chmod(0o600)
    (workdir / "policies").mkdir(parents=True, exist_ok=True)
    (workdir / "policies" / "policy.rego").write_text(POLICY)
    upstream_port = free_port()
    supervisor.start("upstream", [sys.executable, "-m", "authz_server.mesh.upstream", "--addr",
                                  f"127.0.0.1:{upstream_port}", "--name", "shop"],
                     ready=tcp_ready("127.0.0.1", upstream_port))
    config = {
        "addr": "127.0.0.1:0", "metrics_addr": "", "policies": str(workdir / "policies"),
        "audit": [f"file:{workdir / 'decisions.jsonl'}"],
        "issuers": [{"issuer": provider.issuer, "audiences": ["orders", "ledger"], "dpop": "allowed",
                     "introspection": {"client_id": "authz-server", "client_secret_file": str(secret_file)}}],
        "browser_login": {"issuer": provider.issuer, "client_id": "authz-server",
                          "client_secret_file": str(secret_file)},
    }
    (workdir / "authz.yaml").write_text(yaml.safe_dump(config))
    ready_file = workdir / "authz-ready.json"
    ready_file.unlink(missing_ok=True)
    supervisor.start("authz-server", [sys.executable, "-m", "authz_server.cli", "serve", "--config",
                                      str(workdir / "authz.yaml"), "--workers", "1", "--ready-file", str(ready_file)],
                     ready=ready_file.exists, timeout=30)
    authz = json.loads(ready_file.read_text())["addr"]
    cert, key = self_signed(workdir / "tls")
    start_envoy(supervisor, "envoy", render_front_proxy(FrontProxy(
        upstream=f"127.0.0.1:{upstream_port}", listen=f"127.0.0.1:{port}", authz=AuthzTarget(authz),
        routes=(Route("/api/"), Route("/", {"browser": "true"})), tls=(str(cert), str(key)))))
    wait_until(tcp_ready("127.0.0.1", port), timeout=10, what="envoy listener")
    return SignInDemo(origin, str(cert), provider, shop_secret)


def tour(demo: SignInDemo) -> list[Step]:
    from ..identity.dpop import access_token_hash
    from ..identity.jose import public_jwk, thumbprint

    browser = ScriptedBrowser.open(demo.ca_file)
    metadata = demo.provider.metadata()
    dpop_key = ec.generate_private_key(ec.SECP256R1())
    jwk = {k: v for k, v in public_jwk(dpop_key.public_key()).items() if k in ("kty", "crv", "x", "y")}
    state: dict[str, str] = {}

    def proof(method: str, url: str, token: str | None = None) -> str:
        claims = {"jti": secrets.token_urlsafe(12), "htm": method, "htu": url, "iat": int(time.time())}
        if token:
            claims["ath"] = access_token_hash(token)
        return jwt.encode(claims, dpop_key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk})

    async def page_load() -> Outcome:
        r = await browser.request("GET", f"{demo.origin}/account")
        outcome = expect_status(r.status_code, 302, "GET /account in a browser with no session")
        where = urlsplit(r.headers.get("location", ""))
        outcome.said += f"\nsent to {where.scheme}://{where.netloc}{where.path} (code flow, PKCE S256, state, nonce)"
        outcome.ok = outcome.ok and r.headers.get("location", "").startswith(metadata["authorization_endpoint"])
        return outcome

    async def sign_in() -> Outcome:
        login = await browser.go(f"{demo.origin}/account")
        before = len(browser.visits)
        page = await browser.sign_in(login, "alice", "wonderland")
        trips = browser.visits[before:]
        ours = [v for v in trips if v[1].startswith(demo.origin)]
        outcome = expect_status(page.status_code, 200, "signed in at oidc-provider as alice, back on /account")
        outcome.said += f"\n{len(ours)} round trips from the provider's redirect to the page"
        outcome.ok = outcome.ok and len(ours) <= 3 and browser.cookie("__Host-authz-session") is not None
        return outcome

    async def with_cookie() -> Outcome:
        r = await browser.request("GET", f"{demo.origin}/orders/42")
        outcome = expect_status(r.status_code, 200, "GET /orders/42 with the session cookie")
        if r.status_code == 200:
            outcome.said += f"\nthe upstream saw x-authz-subject={r.json()['headers'].get('x-authz-subject')}"
        return outcome

    async def dpop_client() -> Outcome:
        endpoint = metadata["token_endpoint"]
        async with httpx.AsyncClient(timeout=10) as http:
            issued = (await http.post(endpoint, auth=("shop", demo.shop_secret),
                                      headers={"dpop": proof("POST", endpoint)},
                                      data={"grant_type": "client_credentials", "resource": ORDERS})).json()
        state["token"] = issued["access_token"]
        url = f"{demo.origin}/api/orders"
        state["proof"] = proof("GET", url, state["token"])
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=demo.ca_file), timeout=10) as http:
            r = await http.get(url, headers={"authorization": f"DPoP {state['token']}", "dpop": state["proof"]})
        outcome = expect_status(r.status_code, 200, f"an API client with a DPoP-bound token (jkt "
                                                    f"{thumbprint(jwk)[:12]}…) and its proof")
        return outcome

    async def dpop_replay() -> Outcome:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=demo.ca_file), timeout=10) as http:
            r = await http.get(f"{demo.origin}/api/orders",
                               headers={"authorization": f"DPoP {state['token']}", "dpop": state["proof"]})
        outcome = expect_status(r.status_code, 401, "the same proof sent again")
        if r.status_code == 401:
            outcome.said += f"\n{r.json()['error']}: {r.headers.get('www-authenticate', '')[:60]}…"
        return outcome

    async def opaque() -> Outcome:
        async with httpx.AsyncClient(timeout=10) as http:
            issued = (await http.post(metadata["token_endpoint"], auth=("shop", demo.shop_secret),
                                      data={"grant_type": "client_credentials", "resource": LEDGER})).json()
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=demo.ca_file), timeout=10) as http:
            r = await http.get(f"{demo.origin}/api/ledger", headers={"authorization": f"Bearer {issued['access_token']}"})
        return expect_status(r.status_code, 200, "an opaque access token, checked by introspection at the provider")

    async def logout() -> Outcome:
        r = await browser.request("GET", f"{demo.origin}/_authz/logout")
        outcome = expect_status(r.status_code, 302, "GET /_authz/logout")
        again = await browser.request("GET", f"{demo.origin}/orders/42")
        outcome.said += f"\nsent to the provider's end_session_endpoint; the next page load: {again.status_code}"
        outcome.ok = outcome.ok and r.headers.get("location", "").startswith(metadata["end_session_endpoint"]) \
            and again.status_code == 302
        await browser.close()
        return outcome

    return [
        Step("a browser without a session is sent to the provider to sign in", page_load),
        Step("the user signs in; the callback makes the session and sets __Host-authz-session", sign_in),
        Step("later page loads cost a session lookup", with_cookie),
        Step("an API client proves possession of its DPoP key: allowed", dpop_client),
        Step("a replayed DPoP proof: refused", dpop_replay),
        Step("an opaque token: the provider vouches for it (RFC 7662)", opaque),
        Step("the user signs out: the session ends here and at the provider", logout),
    ]


async def run_demo(workdir: Path, *, keep: bool, out: TextIO = sys.stdout) -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"authz-server demo --idp oidc-provider: {reason}", file=sys.stderr)
        return 2
    print(f"authz-server sign-in demo with oidc-provider — logs and configs in {workdir}\n", file=out)
    with Supervisor(workdir / "logs") as supervisor:
        started = time.perf_counter()
        demo = start(supervisor, workdir)
        print(f"up in {time.perf_counter() - started:.1f}s: oidc-provider {demo.provider.issuer}, authz-server, "
              f"Envoy on {demo.origin}\n", file=out)
        result: TourResult = await run_tour(tour(demo), out=out)
        summary = (f"all {len(result.passed)} steps turned out as the tour said." if result.ok
                   else "these steps did not turn out as the tour said: " + "; ".join(result.failed))
        print(f"\n{summary}", file=out)
        if keep:
            print(f"\nStill running (Ctrl-C stops it). Open {demo.origin}/account in a browser that trusts "
                  f"{demo.ca_file}; sign in as alice / wonderland.", file=out)
            await asyncio.Event().wait()
        return 0 if result.ok else 1
