"""Rate buckets, the anomaly score, threat lists and sensitivity, with the clock passed in."""

from __future__ import annotations

import random

import pytest

from authz_server.errors import ConfigError
from authz_server.signals import SignalsConfig
from authz_server.signals.anomaly import AnomalyDetector, AnomalySettings
from authz_server.signals.ratelimit import BucketSpec, MemoryRateLimiter
from authz_server.signals.routes import normalize_route
from authz_server.signals.sensitivity import sensitivity_of
from authz_server.signals.threatintel import ListError, ThreatIntel, ThreatSource, parse_list


async def test_a_burst_is_throttled_others_are_not_and_it_recovers() -> None:
    limiter = MemoryRateLimiter()
    spec = BucketSpec(rate=5, burst=10)
    now = 1000.0
    results = [await limiter.take([("alice", spec)], now) for _ in range(15)]
    assert [r.limited for r in results] == [False] * 10 + [True] * 5
    assert results[-1].retry_after == pytest.approx(0.2)
    assert not (await limiter.take([("bob", spec)], now)).limited  # another identity is untouched
    assert not (await limiter.take([("alice", spec)], now + 0.25)).limited  # one token back after 0.2 s
    assert (await limiter.take([("alice", spec)], now + 0.3)).limited
    calm = await limiter.take([("alice", spec)], now + 10)
    assert not calm.limited and calm.remaining == 9  # full again after calming down


async def test_memory_buckets_stay_bounded() -> None:
    limiter = MemoryRateLimiter(max_keys=1000)
    for i in range(5000):
        await limiter.take([(f"id{i}", BucketSpec(1, 1))], float(i))
    assert len(limiter) == 1000


def test_route_keys_collapse_identifiers() -> None:
    assert normalize_route("/orders/123?x=1") == "/orders/{id}"
    assert normalize_route("/orders/0b7f9c2e-1d2a-4c3b-9e8f-1a2b3c4d5e6f/items") == "/orders/{id}/items"
    assert normalize_route("/users/alice") == "/users/alice"


def test_a_scanner_is_anomalous_within_a_few_dozen_requests() -> None:
    detector = AnomalyDetector()
    now = 0.0
    for i in range(200):  # an ordinary history: a few routes, a request a second
        now += 1.0
        detector.observe("scanner", "GET", f"/orders/{i % 3}" if i % 2 else "/profile", now)
    assert detector.to_input("scanner")["level"] == "normal"
    for i in range(40):
        now += 0.2
        score = detector.observe("scanner", "GET", f"/admin/path{i}", now)
        if score >= 0.8:
            break
    assert score >= 0.8 and i < 20, (i, score)
    assert "new_routes" in detector.to_input("scanner")["reasons"]
    now += 600  # ten quiet minutes later it has calmed down
    assert detector.observe("scanner", "GET", "/profile", now) < 0.4


def test_ten_times_the_usual_rate_is_anomalous_and_recovers() -> None:
    detector = AnomalyDetector()
    rng = random.Random(7)
    now = 0.0
    for _ in range(3000):  # about 2 requests a second for 25 minutes
        now += rng.expovariate(2.0)
        detector.observe("svc", "GET", "/orders", now)
    scores = []
    for _ in range(400):  # then 20 a second
        now += rng.expovariate(20.0)
        scores.append(detector.observe("svc", "GET", "/orders", now))
    assert max(scores) >= 0.8
    assert detector.to_input("svc")["reasons"] == ["rate"]
    for _ in range(600):  # back to normal for five minutes
        now += rng.expovariate(2.0)
        last = detector.observe("svc", "GET", "/orders", now)
    assert last < 0.5


def test_normal_identities_stay_under_the_threshold() -> None:
    """False positives over a long, realistic normal run: 200 identities x 500 requests with
    jittered rates, bursts of double rate, a new endpoint about every ten minutes and 5% denials."""
    detector = AnomalyDetector(AnomalySettings())
    rng = random.Random(42)
    flagged = decisions = 0
    for identity in range(200):
        base_rate = rng.uniform(0.2, 5.0)
        routes = [f"/api/r{n}" for n in range(rng.randint(2, 6))]
        now = 0.0
        for step in range(500):
            rate = base_rate * (2.0 if rng.random() < 0.05 else 1.0)
            gap = rng.expovariate(rate)
            now += gap
            if rng.random() < gap / 600:
                routes.append(f"/api/new{step}")
            score = detector.observe(f"id{identity}", rng.choice(["GET", "POST"]), rng.choice(routes), now)
            detector.record_outcome(f"id{identity}", denied=rng.random() < 0.05)
            decisions += 1
            flagged += score >= detector.settings.threshold
    rate = flagged / decisions
    print(f"anomaly false-positive rate over {decisions} normal requests: {rate:.5%}")
    assert rate == 0.0


def test_anomaly_memory_is_bounded() -> None:
    detector = AnomalyDetector(AnomalySettings(max_identities=10_000, max_routes=8))
    for i in range(100_000):
        detector.observe(f"id{i}", "GET", f"/r{i % 50}", float(i))
    assert len(detector) == 10_000
    for i in range(100):
        detector.observe("one", "GET", f"/x{i}", float(i))
    assert len(detector._states["one"].routes) == 8


def test_threat_lists_match_every_kind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "list.txt"
    path.write_text("# bad actors\n203.0.113.0/24 scanner net\n2001:db8::1\nspiffe://evil.org/* hostile domain\n"
                    "spiffe://example.org/compromised stolen key\nsub:mallory fraud\njti:leaked-token-1 leaked\n")
    intel = ThreatIntel([ThreatSource("feed", path=str(path))])
    assert intel.lookup(ip="203.0.113.77")["matches"][0]["reason"] == "scanner net"
    assert intel.lookup(ip="2001:db8::1")["listed"]
    assert not intel.lookup(ip="198.51.100.1")["listed"]
    assert intel.lookup(spiffe_id="spiffe://evil.org/anything")["listed"]
    assert intel.lookup(spiffe_id="spiffe://example.org/compromised")["listed"]
    assert not intel.lookup(spiffe_id="spiffe://example.org/frontend")["listed"]
    assert intel.lookup(subject="mallory")["matches"][0]["kind"] == "subject"
    assert intel.lookup(jti="leaked-token-1")["listed"]


def test_structured_lists_and_bad_entries() -> None:
    entries = parse_list('{"entries": [{"kind": "ip", "value": "10.0.0.0/8", "reason": "internal"}]}', "x.json")
    assert entries.count() == 1
    with pytest.raises(ListError) as bad:
        parse_list("not-an-ip\n", "list.txt")
    assert "list.txt:1" in str(bad.value)


def test_sensitivity_fails_safe() -> None:
    assert sensitivity_of({"sensitivity": "low"}) == "low"
    assert sensitivity_of({}) == "medium"
    assert sensitivity_of({"sensitivity": "hgih"}) == "high"  # a typo never weakens a route


def test_signals_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as bad:
        SignalsConfig.from_mapping({"rate": {"per_identity": {"rate": 0}}})
    assert bad.value.key == "signals.rate.per_identity.rate"
    with pytest.raises(ConfigError) as bad:
        SignalsConfig.from_mapping({"threat_lists": [{"name": "x"}]})
    assert bad.value.key == "signals.threat_lists[0]"
