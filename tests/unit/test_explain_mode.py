"""Explain mode on the pipeline: the next N decisions of one subject or route are evaluated with
OPA's trace, never from the decision cache or a repeat, never more than N, never after the
TTL; their explanation says why, and holds no secret the request carried."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from authz_server.decision import Identity, Pipeline
from authz_server.envoy import cut_volatile
from authz_server.errors import AuthzError
from authz_server.explaining import ExplainMode
from authz_server.policy.loader import PolicyRuntime
from authz_server.repeats import RepeatCache
from tests.support.audit import a_jwt, check_request_bytes, facts_for, workload
from tests.support.authz import write_policy

POLICY = """package envoy.authz
import rego.v1

default allow := false

allow if input.parsed_path[0] == "public"

allow if {
    input.parsed_path[0] == "orders"
    trace(sprintf("session %s token %s", [input.attributes.request.http.headers["x-session-id"],
                                          input.attributes.request.http.headers.authorization]))
    input.attributes.source.principal == "spiffe://example.org/web"
}
"""
NOW = 1_800_000_000.0


class Workloads:
    """The caller's SPIFFE ID as its identity (the audit log's subject)."""

    async def resolve(self, facts, now):  # type: ignore[no-untyped-def]
        return Identity({"method": "mtls", "workload": {"spiffe_id": facts.source_principal}},
                        fingerprint=facts.source_principal.encode())

    def still_valid(self, identity, now):  # type: ignore[no-untyped-def]
        return True


@pytest.fixture
def pipeline(tmp_path: Path):  # type: ignore[no-untyped-def]
    write_policy(tmp_path, POLICY)
    runtime = PolicyRuntime(str(tmp_path), isolation="inline")
    runtime.load()
    pipeline = Pipeline(runtime, identity=Workloads())
    mode = ExplainMode()
    mode.attach(pipeline)
    yield pipeline, mode
    runtime.close()


async def decide(pipeline: Pipeline, path: str, principal: str = "web", now: float = NOW, **kwargs):  # type: ignore[no-untyped-def]
    return await pipeline.decide(facts_for(path, principal=workload(principal), **kwargs), now=now)


async def test_the_next_n_decisions_of_a_route_are_explained_bypassing_the_cache(pipeline) -> None:  # type: ignore[no-untyped-def]
    pipeline, mode = pipeline
    assert pipeline.explaining is None  # no rule: nothing is matched
    assert (await decide(pipeline, "/public/a")).explanation is None
    assert (await decide(pipeline, "/public/a")).cached
    rule = mode.start(route="/public", count=2, mode="full", now=NOW)
    assert pipeline.explaining is mode
    first, second, third = [await decide(pipeline, "/public/a") for _ in range(3)]
    assert first.explanation is not None and second.explanation is not None
    assert not first.cached and not second.cached  # evaluated, with the trace on
    assert first.explanation["mode"] == "full" and first.allowed
    assert first.explanation["because"] == "decided by data.envoy.authz.allow (policy.rego:6)"
    assert any("Enter data.envoy.authz.allow" in line for line in first.explanation["trace"])
    assert third.explanation is None and third.cached  # N used up: the cache answers again
    assert rule.remaining == 0 and rule.explained == 2 and pipeline.explaining is None
    assert (await decide(pipeline, "/publicity")).explanation is None  # whole segments only


async def test_a_subject_rule_explains_its_denies_too_and_ends_at_its_ttl(pipeline) -> None:  # type: ignore[no-untyped-def]
    pipeline, mode = pipeline
    mode.start(subject=workload("thief"), count=100, ttl=30, now=NOW)
    denied = await decide(pipeline, "/orders/1", principal="thief")
    assert not denied.allowed and denied.explanation is not None
    assert denied.explanation["because"].startswith("the default applied: data.envoy.authz.allow (policy.rego:4)")
    assert denied.explanation["because"].endswith("the input matches none of their indexed conditions (OPA's rule "
                                                  "index))")
    assert (await decide(pipeline, "/orders/1", principal="web")).explanation is None  # another subject
    assert (await decide(pipeline, "/orders/1", principal="thief", now=NOW + 31)).explanation is None  # past TTL
    assert pipeline.explaining is None and mode.live(NOW + 31) == []


async def test_an_undefined_decision_is_explained(tmp_path: Path) -> None:
    write_policy(tmp_path, "package envoy.authz\nimport rego.v1\nallow if input.parsed_path[0] == \"x\"\n")
    runtime = PolicyRuntime(str(tmp_path), isolation="inline")
    runtime.load()
    pipeline = Pipeline(runtime)
    mode = ExplainMode()
    mode.attach(pipeline)
    mode.start(route="/", count=1, now=NOW)
    decision = await pipeline.decide(facts_for("/y"), now=NOW)
    runtime.close()
    assert decision.code == "policy_undefined"
    assert decision.explanation is not None and decision.explanation["because"].startswith("undefined:")


async def test_repeats_step_aside_for_an_explained_request(pipeline) -> None:  # type: ignore[no-untyped-def]
    pipeline, mode = pipeline
    raw = check_request_bytes("/public/r", principal=workload("web"), request_id="1")
    repeats = RepeatCache()
    key, _ = cut_volatile(raw)
    from authz_server.envoy import facts_from_check_request, parse_check_request

    for _ in range(2):  # decided, then cached: now replayable
        facts = facts_from_check_request(parse_check_request(raw))
        decision = await pipeline.decide(facts, now=NOW)
        repeats.put(key, decision, facts, len(raw))
    assert repeats.replay(key, pipeline, NOW) is not None
    mode.start(route="/public", count=1, now=NOW)
    assert repeats.replay(key, pipeline, NOW) is None  # the front decides it instead, and it is explained
    assert (await pipeline.decide(facts_from_check_request(parse_check_request(raw)), now=NOW)).explanation


async def test_explanations_hold_no_secret_the_request_carried(pipeline) -> None:  # type: ignore[no-untyped-def]
    pipeline, mode = pipeline
    session = "sess-" + uuid.uuid4().hex
    token = a_jwt("bob")
    mode.start(route="/orders", count=3, mode="notes", now=NOW)
    decision = await decide(pipeline, "/orders/1", headers={"x-session-id": session,
                                                            "authorization": f"Bearer {token}"})
    text = json.dumps(decision.explanation)
    assert decision.allowed
    assert any(line.endswith('Note "session [REDACTED] token Bearer [REDACTED]"')
               for line in decision.explanation["trace"])
    assert session not in text and token not in text and token.split(".")[0] not in text


def test_rules_are_checked_when_switched_on() -> None:
    mode = ExplainMode()
    for bad in ({}, {"subject": "a", "route": "/b"}, {"route": "orders"}, {"route": "/", "mode": "debug"},
                {"route": "/", "count": 0}, {"route": "/", "count": 1001}, {"route": "/", "ttl": 0},
                {"route": "/", "ttl": 3601}):
        with pytest.raises(AuthzError):
            mode.start(now=NOW, **bad)  # type: ignore[arg-type]
    rules = [mode.start(route=f"/r{i}", now=NOW) for i in range(32)]
    with pytest.raises(AuthzError) as busy:
        mode.start(route="/one-more", now=NOW)
    assert busy.value.code == "explain_busy"
    assert mode.stop(rules[0].id) == 1 and mode.stop() == 31 and mode.live(NOW) == []
