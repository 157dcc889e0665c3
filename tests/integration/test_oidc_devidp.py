"""IssuerRegistry against the dev OIDC provider served on a real port: discovery, tokens from
its token endpoint, key rotation, the rate-limited unknown-kid refresh, the provider going
down (stale, then fail closed, then recovery), and two issuers at once."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz_server.devidp import DevIdP, DevIdPConfig
from authz_server.devidp.keys import sign_jwt
from authz_server.errors import TokenError, UnavailableError
from authz_server.identity.encoding import b64url_decode, json_object
from authz_server.identity.oidc import IssuerConfig, IssuerRegistry
from authz_server.mesh.processes import Supervisor, free_port, tcp_ready
from tests.support.jwt import attacker_keys, signed


class Clock:
    """Time for both sides of a test, moved by the test (the provider and the registry read it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def provider_config(**overrides: Any) -> DevIdPConfig:
    data: dict[str, Any] = {
        "addr": "127.0.0.1:0",
        "token_ttl": "2h",
        "key_publish_ahead": "60s",
        "jwks_max_age": "60s",
        "users": [{"username": "alice", "password": "alice-pw", "claims": {"roles": ["customer"]}}],
        "clients": [{"client_id": "frontend", "client_secret": "fe-secret", "grants": ["password", "client_credentials"],
                     "audiences": ["orders-api"], "scopes": ["orders:read"]}],
    }
    data.update(overrides)
    return DevIdPConfig.from_mapping(data)


def issuer_config(issuer: str, index: int = 0, **refresh: Any) -> IssuerConfig:
    return IssuerConfig.from_mapping(
        {"issuer": issuer, "audiences": ["orders-api"], "typ": "at+jwt",
         "refresh": {"default_max_age": "1h", "unknown_kid_interval": "30s", **refresh}},
        f"issuers[{index}]")


async def password_token(idp: DevIdP, client: httpx.AsyncClient) -> str:
    response = await client.post(f"{idp.issuer}/token", auth=("frontend", "fe-secret"),
                                 data={"grant_type": "password", "username": "alice", "password": "alice-pw"})
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def bogus_kid_token(idp: DevIdP, kid: str, now: float) -> str:
    pair = attacker_keys()[0]
    claims = {"iss": idp.issuer, "sub": "mallory", "aud": "orders-api", "exp": int(now) + 600, "iat": int(now),
              "jti": kid, "client_id": "frontend"}
    return signed({"alg": "RS256", "typ": "at+jwt", "kid": kid}, claims, "RS256", pair.private_key)


async def test_discovery_and_a_token_from_the_token_endpoint() -> None:
    async with DevIdP(provider_config()) as idp, httpx.AsyncClient() as client:
        token = await password_token(idp, client)
        async with IssuerRegistry([issuer_config(idp.issuer)]) as registry:
            assert registry.ready
            verified = await registry.validate(token, now=time.time())
            assert (verified.issuer, verified.subject) == (idp.issuer, "alice")
            assert verified.claims["roles"] == ["customer"] and verified.header["typ"] == "at+jwt"
            status = registry.status()[0]
            assert status.source.startswith("discovery ") and set(status.kids) == {k["kid"] for k in idp.jwks()["keys"]}
            assert (status.refreshes, status.failures, status.stale) == (1, 0, False)
            # the admin API reads statuses as mappings
            assert vars(status)["issuer"] == idp.issuer and status.as_dict()["kids"] == status.kids
        assert idp.requests["discovery"] == 1 and idp.requests["jwks"] == 1


async def test_rotation_is_picked_up_on_unknown_kid_and_bogus_kids_cannot_hammer_the_provider() -> None:
    clock = Clock()
    t0 = clock.now
    # the JWKS stays fresh for an hour: only unknown kids can cause a refresh here
    async with (DevIdP(provider_config(algorithms=["RS256"], jwks_max_age="1h"), clock=clock) as idp,
                httpx.AsyncClient() as client):
        registry = IssuerRegistry([issuer_config(idp.issuer)], clock=clock)
        old_token = await password_token(idp, client)
        await registry.validate(old_token, now=t0)
        assert idp.requests["jwks"] == 1

        (new_kid,) = idp.rotate_keys()  # published now, signs from t0 + 60 s
        clock.now = t0 + 61
        new_token = await password_token(idp, client)
        assert json_object(b64url_decode(new_token.split(".")[0]))["kid"] == new_kid
        verified = await registry.validate(new_token, now=clock.now)  # unknown kid → one refresh
        assert verified.subject == "alice" and idp.requests["jwks"] == 2
        assert registry.status(clock.now)[0].unknown_kid_refreshes == 1
        assert new_kid in registry.status(clock.now)[0].kids

        # 20 made-up kids right after: the refresh interval holds them all back
        for i in range(20):
            with pytest.raises(TokenError) as caught:
                await registry.validate(bogus_kid_token(idp, f"bogus-{i}", clock.now), now=clock.now + 1)
            assert caught.value.code == "unknown_kid"
        assert idp.requests["jwks"] == 2
        assert registry.status(clock.now)[0].unknown_kid_throttled == 20

        # 20 made-up kids at once, after the interval: they share a single fetch
        later = clock.now + 31
        results = await asyncio.gather(
            *(registry.validate(bogus_kid_token(idp, f"flood-{i}", later), now=later) for i in range(20)),
            return_exceptions=True)
        assert all(isinstance(r, TokenError) and r.code == "unknown_kid" for r in results)
        assert idp.requests["jwks"] == 3
        status = registry.status(later)[0]
        assert status.unknown_kid_refreshes == 2 and status.refreshes == 3

        # tokens signed by the retired key stay valid while they live (the key stays published)
        assert (await registry.validate(old_token, now=later)).subject == "alice"
        await registry.close()


async def test_provider_down_keys_served_stale_within_bound_then_fail_closed_then_recover() -> None:
    clock = Clock()
    t0 = clock.now
    idp = DevIdP(provider_config(), clock=clock)
    await idp.start()
    address = idp.issuer.removeprefix("http://")
    async with httpx.AsyncClient() as client:
        token = await password_token(idp, client)
    # JWKS says max-age=60; stale for at most 120 s more; retry 10 s after a failure
    registry = IssuerRegistry([issuer_config(idp.issuer, default_max_age="5m", min_max_age="30s",
                                             max_stale="120s", retry_interval="10s", timeout="1s")], clock=clock)
    await registry.validate(token, now=t0)
    assert registry.status(t0)[0].fresh_until == pytest.approx(t0 + 60)
    await idp.stop()

    # past freshness, within the stale bound: answered from the last good set, refresh behind
    assert (await registry.validate(token, now=t0 + 90)).subject == "alice"
    await registry.wait_idle()
    status = registry.status(t0 + 90)[0]
    assert status.stale and status.available and status.failures == 1 and status.last_error
    assert status.usable_until == pytest.approx(t0 + 180)
    assert (await registry.validate(token, now=t0 + 179)).subject == "alice"

    # past the bound: fail closed, with a code the pipeline maps to 503
    with pytest.raises(UnavailableError) as caught:
        await registry.validate(token, now=t0 + 181)
    assert caught.value.code == "jwks_unavailable" and caught.value.status == 503
    assert not registry.status(t0 + 181)[0].available

    # the provider returns on the same address: the next attempt after the retry delay recovers
    await idp.start(address)
    with pytest.raises(UnavailableError):
        await registry.validate(token, now=t0 + 185)  # within the retry delay: no new attempt yet
    assert (await registry.validate(token, now=t0 + 200)).subject == "alice"
    status = registry.status(t0 + 200)[0]
    assert not status.stale and status.available and status.refreshes == 2
    await registry.close()
    await idp.stop()


async def test_two_issuers_at_once() -> None:
    async with (DevIdP(provider_config(algorithms=["RS256"])) as first,
                DevIdP(provider_config(algorithms=["ES256"])) as second,
                httpx.AsyncClient() as client):
        configs = [issuer_config(first.issuer, 0), issuer_config(second.issuer, 1)]
        async with IssuerRegistry(configs) as registry:
            now = time.time()
            one = await registry.validate(await password_token(first, client), now=now)
            two = await registry.validate(await password_token(second, client), now=now)
            assert (one.issuer, one.header["alg"]) == (first.issuer, "RS256")
            assert (two.issuer, two.header["alg"]) == (second.issuer, "ES256")

            # the first provider's key signing a token that claims to come from the second
            key = first.keys.signing_key("RS256", now)
            claims = {"iss": second.issuer, "sub": "alice", "aud": "orders-api", "exp": int(now) + 60,
                      "iat": int(now), "jti": "x", "client_id": "frontend"}
            with pytest.raises(TokenError) as caught:
                await registry.validate(sign_jwt({"typ": "at+jwt"}, claims, key), now=now)
            assert caught.value.code == "unknown_kid"

            stranger = {**claims, "iss": "https://stranger.example"}
            with pytest.raises(TokenError) as caught:
                await registry.validate(sign_jwt({"typ": "at+jwt"}, stranger, key), now=now)
            assert caught.value.code == "untrusted_issuer"
            assert [s.issuer for s in registry.status()] == [first.issuer, second.issuer]


async def test_discovery_naming_another_issuer_is_refused() -> None:
    async with DevIdP(provider_config(issuer="http://127.0.0.1:1/elsewhere", addr="127.0.0.1:0")) as idp:
        config = IssuerConfig.from_mapping(
            {"issuer": f"http://{idp.address}", "audiences": ["orders-api"],
             "discovery": f"http://{idp.address}/elsewhere/.well-known/openid-configuration"}, "issuers[0]")
        async with IssuerRegistry([config]) as registry:
            status = registry.status()[0]
            assert not status.available and "is not" in (status.last_error or "")
            assert not registry.ready


def test_devidp_cli_serves_discovery_and_tokens(tmp_path: Path, supervisor: Supervisor) -> None:
    port = free_port()
    config = tmp_path / "devidp.yaml"
    config.write_text(
        "users:\n  - {username: alice, password: alice-pw}\n"
        "clients:\n  - {client_id: frontend, client_secret: fe-secret, grants: [password], audiences: [orders-api]}\n")
    supervisor.start("devidp", [sys.executable, "-m", "authz_server.cli", "devidp", "serve", "--config", str(config),
                                "--addr", f"127.0.0.1:{port}"], ready=tcp_ready("127.0.0.1", port))
    base = f"http://127.0.0.1:{port}"
    with httpx.Client() as client:
        assert client.get(f"{base}/.well-known/openid-configuration").json()["issuer"] == base
        response = client.post(f"{base}/token", auth=("frontend", "fe-secret"),
                               data={"grant_type": "password", "username": "alice", "password": "alice-pw"})
        assert response.status_code == 200 and response.json()["token_type"] == "Bearer"
    log = (tmp_path / "logs").glob("devidp*")
    assert any("DEVELOPMENT ONLY" in p.read_text() for p in log)


class ObservedDevIdP(DevIdP):
    """The real provider, telling the test when its JWKS has been fetched a given number of times."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetched: dict[int, asyncio.Event] = {}

    def handle(self, request: Any) -> Any:
        response = super().handle(request)
        event = self.fetched.get(self.requests["jwks"])
        if event is not None:
            event.set()
        return response


async def test_background_refresh_runs_before_expiry_and_finds_a_new_key() -> None:
    # max-age 4 s (the registry's lower bound lowered to allow it): refreshed at 80% of that, 3.2 s,
    # which leaves a busy machine 0.8 s before the set would expire
    async with ObservedDevIdP(provider_config(jwks_max_age="4s")) as idp:
        second = idp.fetched[2] = asyncio.Event()
        config = issuer_config(idp.issuer, min_max_age="1s", default_max_age="4s")
        async with IssuerRegistry([config]) as registry:
            started = time.monotonic()
            new_kids = set(idp.rotate_keys())
            await asyncio.wait_for(second.wait(), timeout=10)
            elapsed = time.monotonic() - started
            await registry.wait_idle()
            status = registry.status()[0]
            assert new_kids <= set(status.kids) and status.refreshes == 2 and not status.stale
            assert elapsed < 4.0  # before the set expired, not after
