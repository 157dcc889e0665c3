"""Signals against a real Redis and through the server with the shipped default policy."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from authz_server.config import Config
from authz_server.envoy import check_request_from_json, check_response, facts_from_check_request
from authz_server.errors import UnavailableError
from authz_server.signals import SignalsConfig
from authz_server.signals.ratelimit import BucketSpec, RedisRateLimiter
from authz_server.server import build_app
from tests.support.authz import REPO


@pytest.mark.redis
async def test_two_replicas_share_one_bucket_atomically(redis_server) -> None:
    one, two = RedisRateLimiter(redis_server.url), RedisRateLimiter(redis_server.url)
    spec = BucketSpec(rate=0.001, burst=50)  # no refill during the test
    now = time.time()
    try:
        results = await asyncio.gather(*[(one if i % 2 else two).take([("alice", spec)], now) for i in range(200)])
        granted = sum(not r.limited for r in results)
        assert granted == 50  # never more than the burst, whichever replica asked
        assert (await one.take([("bob", spec)], now)).remaining == 49  # another identity, its own bucket
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(UnavailableError) as down:
            await one.take([("alice", spec)], now)
        assert down.value.code == "ratelimit_unavailable" and time.monotonic() - started < 10  # fails, not hangs
        redis_server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                await one.take([("carol", spec)], now)
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "the limiter did not recover"
                await asyncio.sleep(0.05)
    finally:
        await one.close()
        await two.close()


def _check(path: str, *, caller: str = "spiffe://example.org/frontend", service: str = "orders",
           address: str = "10.0.0.5") -> object:
    return check_request_from_json({"attributes": {
        "source": {"principal": caller, "address": {"socketAddress": {"address": address, "portValue": 1000}}},
        "contextExtensions": {"service": service, "sensitivity": "medium"},
        "request": {"http": {"method": "GET", "path": path, "headers": {}}}}})


async def _app(tmp_path: Path, signals: dict) -> object:
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    app = build_app(Config(policies=str(policies), addr="", metrics_addr="", trust_domains=("example.org",),
                           signals=SignalsConfig.from_mapping(signals, base_dir=str(tmp_path))))
    app.runtime.load()
    return app


async def test_a_burst_is_throttled_with_429_and_others_are_not(tmp_path: Path) -> None:
    app = await _app(tmp_path, {"rate": {"per_identity": {"rate": 5, "burst": 10}}})
    now = 1000.0
    codes = []
    for _ in range(14):
        decision = await app.pipeline.decide(facts_from_check_request(_check("/orders")), now=now)
        codes.append(decision.code)
    assert codes[:10] == ["allowed"] * 10 and set(codes[10:]) == {"rate_limited"}
    throttled = await app.pipeline.decide(facts_from_check_request(_check("/orders")), now=now)
    answer = check_response(throttled)
    assert answer.denied_response.status.code == 429
    assert {h.header.key: h.header.value for h in answer.denied_response.headers}["retry-after"] == "1"
    other = await app.pipeline.decide(facts_from_check_request(_check("/orders", caller="spiffe://example.org/orders",
                                                                      service="payments")), now=now)
    assert other.code != "rate_limited"
    later = await app.pipeline.decide(facts_from_check_request(_check("/orders")), now=now + 3)
    assert later.allowed  # recovered by itself
    assert app.pipeline.signals.stats.throttled == 5
    await app.stop(0)


async def test_a_scanner_is_refused_by_the_default_policy(tmp_path: Path) -> None:
    app = await _app(tmp_path, {})
    now = 1000.0
    for i in range(100):  # a normal history
        now += 1
        assert (await app.pipeline.decide(facts_from_check_request(_check(f"/orders/{i}")), now=now)).allowed
    codes = []
    for i in range(60):
        now += 0.1
        codes.append((await app.pipeline.decide(facts_from_check_request(_check(f"/orders/x{i}/admin/p{i}")),
                                                now=now)).code)
    assert "anomalous_behaviour" in codes
    assert codes.index("anomalous_behaviour") < 30
    await app.stop(0)


async def test_a_threat_list_edit_takes_effect_within_a_second(tmp_path: Path) -> None:
    threats = tmp_path / "threats.txt"
    threats.write_text("# nothing yet\n")
    app = await _app(tmp_path, {"threat_lists": [{"name": "feed", "path": "threats.txt"}]})
    watcher = asyncio.create_task(app.pipeline.signals.watch())
    try:
        now = time.time()
        assert (await app.pipeline.decide(facts_from_check_request(_check("/orders", address="203.0.113.9")),
                                          now=now)).allowed
        generation = app.pipeline.signals.threats.generation
        threats.write_text("203.0.113.0/24 botnet\n")
        started = time.monotonic()
        while app.pipeline.signals.threats.generation == generation:
            assert time.monotonic() - started < 10, "the list edit was not picked up"
            await asyncio.sleep(0.02)
        refused = await app.pipeline.decide(facts_from_check_request(_check("/orders", address="203.0.113.9")),
                                            now=now)
        assert refused.code == "threat_listed"
        assert refused.signals["threat"]["matches"][0]["reason"] == "botnet"
        threats.write_text("this is not an address\n")  # broken: the last good list stays
        started = time.monotonic()
        while "feed" not in app.pipeline.signals.threats.errors:
            assert time.monotonic() - started < 10, "the broken list was not noticed"
            await asyncio.sleep(0.02)
        assert (await app.pipeline.decide(facts_from_check_request(_check("/orders", address="203.0.113.9")),
                                          now=now)).code == "threat_listed"
        assert 'authz_threat_list_error{list="feed"} 1.0' in app.metrics.exposition().decode()
    finally:
        watcher.cancel()
        await app.stop(0)




async def test_credential_stuffing_is_refused_and_named(tmp_path: Path) -> None:
    from authz_server.devidp.config import DevIdPConfig
    from authz_server.devidp.provider import DevIdP
    from authz_server.identity.oidc import IssuerConfig

    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    async with DevIdP(DevIdPConfig.from_mapping({"addr": "127.0.0.1:0"})) as idp:
        app = build_app(Config(policies=str(policies), addr="", metrics_addr="",
                               issuers=(IssuerConfig.from_mapping({"issuer": idp.issuer, "audiences": ["a"]},
                                                                  "issuers[0]"),),
                               signals=SignalsConfig.from_mapping({"auth_failures": {"rate": 0.1, "burst": 5}})))
        app.runtime.load()
        await app._start_identity()

        def attempt(address: str, guess: int) -> object:
            return check_request_from_json({"attributes": {
                "source": {"address": {"socketAddress": {"address": address}}},
                "request": {"http": {"method": "GET", "path": "/", "headers": {
                    "authorization": f"Bearer not.a-valid.token{guess}"}}}}})

        now = 1000.0
        codes = [(await app.pipeline.decide(facts_from_check_request(attempt("198.51.100.7", i)), now=now)).code
                 for i in range(10)]
        assert codes[:5] == ["malformed_token"] * 5
        assert codes[6:] == ["credential_stuffing"] * 4  # refused before its token is even read
        refused = await app.pipeline.decide(facts_from_check_request(attempt("198.51.100.7", 99)), now=now)
        assert refused.http_status == 429
        other = await app.pipeline.decide(facts_from_check_request(attempt("198.51.100.8", 1)), now=now)
        assert other.code == "malformed_token"  # another source is not affected
        later = await app.pipeline.decide(facts_from_check_request(attempt("198.51.100.7", 1)), now=now + 60)
        assert later.code == "malformed_token"  # it calmed down: its attempts are judged again
        await app.stop(0)
