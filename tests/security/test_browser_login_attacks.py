"""Every browser sign-in misuse case (tests/vectors/jwt_attacks/login_cases.json) is refused,
against a real oidc-provider: the callback through ``BrowserLogin`` as the check runs it, the
PKCE cases at the provider itself (authz-server always sends PKCE; the provider must insist)."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.errors import IdentityError
from authz_server.identity.browser import BrowserLogin, BrowserLoginConfig, SignInRedirect
from authz_server.identity.oidc import IssuerConfig, IssuerRegistry
from authz_server.identity.sessions import MemoryStore
from authz_server.mesh.browser import ScriptedBrowser
from tests.support.oidc import needs_oidc_provider, start_provider

pytestmark = needs_oidc_provider()
CASES = json.loads((Path(__file__).parents[1] / "vectors" / "jwt_attacks" / "login_cases.json").read_text())["cases"]
ORIGIN = "https://app.test"


def facts(path: str, cookies: dict[str, str] | None = None) -> Any:
    headers = {"x-forwarded-proto": "https", ":authority": "app.test"}
    if cookies:
        headers["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    return facts_from_check_request(check_request_from_json({"attributes": {
        "contextExtensions": {"browser": "true"},
        "request": {"http": {"method": "GET", "path": path, "host": "app.test", "headers": headers}}}}))


class World:
    def __init__(self, provider: Any, login: BrowserLogin, secret: str) -> None:
        self.provider, self.login, self.secret = provider, login, secret

    async def begin(self, now: float) -> tuple[str, dict[str, str]]:
        """Start a sign-in as a page load would: the provider URL and the pre-auth cookie."""
        redirect = await self.login.start(facts("/account"), now)
        headers = dict(redirect.headers)
        name, _, rest = headers["set-cookie"].partition("=")
        return headers["location"], {name: rest.split(";", 1)[0]}

    async def code_for(self, authorize_url: str, user: str = "alice", password: str = "wonderland") -> dict[str, str]:
        """Sign in at the provider; the query of the callback it sends the browser to."""
        browser = ScriptedBrowser(httpx.AsyncClient(follow_redirects=False, timeout=10))
        try:
            page = await browser.go(authorize_url, stop_before=ORIGIN)
            if page.status_code in (302, 303):
                back = page
            else:
                back = await browser.sign_in(page, user, password, stop_before=ORIGIN)
        finally:
            await browser.close()
        return {k: v[0] for k, v in parse_qs(urlsplit(back.headers["location"]).query).items()}

    async def callback(self, query: dict[str, str], cookies: dict[str, str], now: float) -> SignInRedirect:
        async def open_session(subject: str, claims: Any) -> tuple[str, float]:
            return "s" * 43, now + 60
        return await self.login.finish(facts(f"/_authz/callback?{urlencode(query)}", cookies), now, open_session)


def browser_login(provider: Any, **settings: str) -> tuple[BrowserLogin, IssuerRegistry]:
    """``BrowserLogin`` wired as the server wires it: the issuer's registry, a session store."""
    registry = IssuerRegistry([IssuerConfig.from_mapping({"issuer": provider.issuer, "audiences": ["orders"]},
                                                         "issuers[0]")])
    store = MemoryStore()

    async def first_use(state: str, until: float, now: float) -> bool:
        return await store.claim_jti("browser-login", state, "callback", until=until, now=now) is None

    login = BrowserLogin(BrowserLoginConfig.from_mapping({"issuer": provider.issuer, **settings}),
                         metadata=lambda: registry.metadata(provider.issuer), keys=registry.keys(provider.issuer).current,
                         policy=registry.policy(provider.issuer), claim_once=first_use)
    return login, registry


@pytest.fixture
async def world(supervisor, tmp_path: Path):  # type: ignore[no-untyped-def]
    provider, client_secrets = start_provider(supervisor, tmp_path / "op", redirect_origins=(ORIGIN,))
    (tmp_path / "secret").write_text(client_secrets["authz-server"])
    login, registry = browser_login(provider, client_id="authz-server", client_secret_file=str(tmp_path / "secret"))
    yield World(provider, login, client_secrets["authz-server"])
    await login.close()
    await registry.close()


async def attempt(world: World, recipe: str) -> str:
    """Run one recipe; the refusal's code (an IdentityError code, or the provider's OAuth error)."""
    now = time.time()
    url, cookies = await world.begin(now)
    if recipe in ("no_verifier", "no_challenge"):
        return await at_the_provider(world, recipe, url)
    if recipe == "foreign_nonce":
        # Same PKCE challenge as our sign-in, another nonce: as if the attacker knew our challenge.
        params = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        params["nonce"] = secrets.token_urlsafe(16)
        query = await world.code_for(f"{url.split('?')[0]}?{urlencode(params)}")
        query["state"] = params["state"]
    elif recipe == "foreign_code":
        other_url, _ = await world.begin(now)
        query = await world.code_for(other_url, "mallory", "mallory-pw")
        query["state"] = parse_qs(urlsplit(url).query)["state"][0]
    else:
        query = await world.code_for(url)
    name, value = next(iter(cookies.items()))
    if recipe == "no_state":
        query.pop("state")
    elif recipe == "no_cookie":
        cookies = {}
    elif recipe == "forged_cookie":
        cookies = {name: base64.urlsafe_b64encode(secrets.token_bytes(120)).decode().rstrip("=")}
    elif recipe == "swapped_cookie":
        _, other = await world.begin(now)
        cookies = {name: next(iter(other.values()))}
    elif recipe == "expired":
        now += world.login.config.login_timeout + 1
    elif recipe == "provider_error":
        query = {"error": "access_denied", "state": query["state"]}
    elif recipe == "wrong_iss":
        query["iss"] = "https://evil.example"
    elif recipe == "no_code":
        query.pop("code")
    elif recipe == "replay":
        done = await world.callback(query, cookies, now)
        assert done.code == "signed_in"
    with pytest.raises(IdentityError) as caught:
        await world.callback(query, cookies, now)
    assert not isinstance(caught.value, SignInRedirect)
    return caught.value.code


async def at_the_provider(world: World, recipe: str, url: str) -> str:
    """PKCE downgrades, tried directly at the provider (an attacker does not go through us)."""
    params = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    if recipe == "no_challenge":
        params.pop("code_challenge")
        params.pop("code_challenge_method")
        query = await world.code_for(f"{url.split('?')[0]}?{urlencode(params)}")
        return query.get("error", "no error")
    query = await world.code_for(url)
    metadata = world.provider.metadata()
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(metadata["token_endpoint"], auth=("authz-server", world.secret), data={
            "grant_type": "authorization_code", "code": query["code"], "redirect_uri": params["redirect_uri"]})
    return answer.json().get("error", f"HTTP {answer.status_code}")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
async def test_sign_in_attack_is_refused(case: dict[str, Any], world: World) -> None:
    assert await attempt(world, case["recipe"]) == case["expected"]


async def test_the_honest_sign_in_beside_them_succeeds(world: World) -> None:
    now = time.time()
    url, cookies = await world.begin(now)
    query = await world.code_for(url)
    done = await world.callback(query, cookies, now)
    headers = dict(done.headers)
    assert done.code == "signed_in" and headers["location"] == "/account"


async def test_private_key_jwt_client_authentication(supervisor, tmp_path: Path) -> None:
    """``browser_login.private_key_jwt``: the code is redeemed with an RFC 7523 assertion."""
    from authz_server.mesh.oidcprovider import signing_key

    private = signing_key("ES256")
    public = {k: v for k, v in private.items() if k != "d"}
    provider, _ = start_provider(supervisor, tmp_path / "op", redirect_origins=(ORIGIN,), extra_clients=({
        "client_id": "pkjwt", "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "ES256", "jwks": {"keys": [public]},
        "grant_types": ["authorization_code"], "response_types": ["code"],
        "redirect_uris": [f"{ORIGIN}/_authz/callback"]},))
    (tmp_path / "client.jwk").write_text(json.dumps(private))
    login, registry = browser_login(provider, client_id="pkjwt", private_key_jwt=str(tmp_path / "client.jwk"))
    try:
        world = World(provider, login, "")
        now = time.time()
        url, cookies = await world.begin(now)
        done = await world.callback(await world.code_for(url), cookies, now)
        assert done.code == "signed_in"
    finally:
        await login.close()
        await registry.close()
