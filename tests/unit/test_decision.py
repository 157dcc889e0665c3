"""The decision pipeline: every outcome a policy can have, the decision cache (key, TTL,
invalidation, clock-reading policies), dry-run and replay; and the property that a cached
answer is always the answer the policy would give."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server.decision import DECISION_ID_HEADER, Decision, DecisionSettings, Identity, Pipeline
from authz_server.envoy import CheckResponse, check_request_from_json, check_response_bytes, facts_from_check_request
from authz_server.facts import Facts
from authz_server.policy.loader import PolicyRuntime
from tests.support.authz import write_policy

NOW = 1_700_000_000.0

OUTCOMES = """
package envoy.authz
import rego.v1

# No default: a path none of these name leaves the decision undefined.
allow if input.parsed_path[0] == "yes"

allow := false if input.parsed_path[0] in {"no", "legal-ish"}

allow := {"allowed": false, "http_status": 410, "body": "gone"} if input.parsed_path[0] == "legal"

allow := input.parsed_query.value[0] if input.parsed_path[0] == "value"

allow := true if input.parsed_path[0] == "conflict"
allow := false if input.parsed_path[0] == "conflict"

allow := {"allowed": true} if {
    input.parsed_path[0] == "slow"
    count([x | some x in numbers.range(1, 100000)]) > 0
}
"""


def request(path: str = "/", method: str = "GET", headers: dict[str, str] | None = None, body: str = "",
            **extra: Any) -> Facts:
    http: dict[str, Any] = {"method": method, "path": path, "headers": dict(headers or {})}
    if body:
        http["body"] = body
    return facts_from_check_request(check_request_from_json({"attributes": {"request": {"http": http}, **extra}}))


def runtime_for(folder: Path, source: str, **files: str) -> PolicyRuntime:
    write_policy(folder, source)
    for name, text in files.items():
        write_policy(folder, text, name.replace("_dot_", "."))
    runtime = PolicyRuntime(str(folder), isolation="inline")
    runtime.load()
    return runtime


@pytest.fixture
def outcomes(tmp_path: Path) -> Iterator[PolicyRuntime]:
    runtime = runtime_for(tmp_path, OUTCOMES)
    yield runtime
    runtime.close()


def decide(pipeline: Pipeline, facts: Facts, now: float = NOW) -> Decision:
    return asyncio.run(pipeline.decide(facts, now=now))


@pytest.mark.parametrize(("path", "allowed", "code", "status"), [
    ("/yes", True, "allowed", 200),
    ("/no", False, "policy_denied", 403),
    ("/legal", False, "policy_denied", 410),
    ("/value?value=x", False, "policy_result_invalid", 404),  # a string is not a decision
    ("/value", False, "policy_undefined", 404),
    ("/conflict", False, "policy_eval_error", 404),
], ids=["allow", "deny", "deny-with-status", "not-a-decision", "undefined", "eval-error"])
def test_what_the_policy_says_or_fails_to_say(outcomes: PolicyRuntime, path: str, allowed: bool, code: str,
                                               status: int) -> None:
    pipeline = Pipeline(outcomes, settings=DecisionSettings(deny_status=404))
    decision = decide(pipeline, request(path))
    assert (decision.allowed, decision.code, decision.http_status, decision.phase) == (allowed, code, status, "policy")
    assert decision.policy_version == outcomes.active.version
    assert uuid.UUID(decision.decision_id).version == 4  # as OPA's decision ids


def test_a_timeout_denies_and_the_next_request_is_decided(tmp_path: Path) -> None:
    write_policy(tmp_path, OUTCOMES)
    runtime = PolicyRuntime(str(tmp_path), isolation="thread")
    runtime.load()
    try:
        hasty = Pipeline(runtime, settings=DecisionSettings(policy_timeout=0.02))
        patient = Pipeline(runtime, settings=DecisionSettings(policy_timeout=60))  # a busy machine is slow

        async def both() -> tuple[Decision, Decision]:
            return (await hasty.decide(request("/slow"), now=NOW), await patient.decide(request("/yes"), now=NOW))

        slow, fast = asyncio.run(both())
        assert (slow.allowed, slow.code, slow.http_status) == (False, "policy_timeout", 403)
        assert fast.allowed
        assert runtime.status.timeouts == 1
    finally:
        runtime.close()


def test_before_any_policy_loads_everything_is_denied(tmp_path: Path) -> None:
    runtime = PolicyRuntime(str(tmp_path / "missing"))
    decision = decide(Pipeline(runtime, settings=DecisionSettings(deny_status=503)), request("/yes"))
    assert (decision.allowed, decision.code, decision.http_status, decision.policy_version) == (
        False, "policy_not_loaded", 503, "")


def test_a_bug_anywhere_denies(outcomes: PolicyRuntime) -> None:
    class Broken:
        async def resolve(self, facts: Facts, now: float) -> Identity:
            return {"not": "an Identity"}  # type: ignore[return-value]

    decision = decide(Pipeline(outcomes, identity=Broken()), request("/yes"))
    assert (decision.allowed, decision.code, decision.phase) == (False, "internal_error", "internal")


def test_a_bug_is_logged_where_it_happened_but_not_what_the_request_carried(
        outcomes: PolicyRuntime, caplog: pytest.LogCaptureFixture) -> None:
    """An exception's message can quote the request (int() quotes the text it could not read):
    the log says the type and the frames, never the message."""
    class Reading:
        async def resolve(self, facts: Facts, now: float) -> Identity:
            return int(facts.header("x-count"))  # type: ignore[return-value]

    caplog.set_level("DEBUG")
    decision = decide(Pipeline(outcomes, identity=Reading()), request("/yes", headers={"x-count": "pw=hunter2"}))
    assert decision.code == "internal_error" and "hunter2" not in decision.reason
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "ValueError" in record.getMessage() and "test_decision.py" in record.getMessage()
    assert "hunter2" not in caplog.text and record.exc_info is None


# -- the cache

def test_a_repeat_is_a_hit_and_noise_does_not_matter(outcomes: PolicyRuntime) -> None:
    pipeline = Pipeline(outcomes)
    def peer(port: int) -> dict[str, Any]:
        return {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": port}}}

    first = decide(pipeline, request("/yes", headers={"x-request-id": "1"}, source=peer(1234)))
    second = decide(pipeline, request("/yes", headers={"x-request-id": "2", "traceparent": "00-x"}, source=peer(4)))
    # keyed on what the policy reads (the path, the query): other headers do not matter
    unread = decide(pipeline, request("/yes?page=2", headers={"x-role": "admin"}, source=peer(4)))
    other = decide(pipeline, request("/yes/1", headers={"x-role": "admin"}, source=peer(4)))
    assert (first.cached, second.cached, unread.cached, other.cached) == (False, True, True, False)
    assert decide(pipeline, request("/yes?value=x", source=peer(5))).cached is False  # it reads parsed_query.value
    assert second.allowed and second.decision_id != first.decision_id
    assert (pipeline.cache.stats.hits, pipeline.cache.stats.misses) == (2, 3)
    denied = [decide(pipeline, request("/legal")) for _ in range(2)]
    assert [d.cached for d in denied] == [False, True]
    assert denied[1].http_status == 410 and denied[1].body == "gone"  # a deny is cached with its answer


def test_errors_are_never_cached(outcomes: PolicyRuntime) -> None:
    pipeline = Pipeline(outcomes)
    for path in ("/conflict", "/value", "/value?value=x"):
        assert [decide(pipeline, request(path)).cached for _ in range(2)] == [False, False]
    assert len(pipeline.cache) == 0


def test_entries_live_for_the_ttl(outcomes: PolicyRuntime) -> None:
    pipeline = Pipeline(outcomes, settings=DecisionSettings(cache_ttl=5.0))
    assert not decide(pipeline, request("/yes"), NOW).cached
    hit = decide(pipeline, request("/yes"), NOW + 4.99)
    assert hit.cached and hit.valid_until == NOW + 5.0
    assert not decide(pipeline, request("/yes"), NOW + 5.0).cached
    assert pipeline.cache.stats.expirations == 1


def test_a_new_policy_version_drops_the_cache(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, "package envoy.authz\nimport rego.v1\nallow if input.parsed_path[0] == \"a\"\n")
    try:
        pipeline = Pipeline(runtime)
        assert decide(pipeline, request("/a")).allowed
        assert decide(pipeline, request("/a")).cached
        write_policy(tmp_path, "package envoy.authz\nimport rego.v1\ndefault allow := false\n")
        assert asyncio.run(runtime.reload())
        after = decide(pipeline, request("/a"))
        assert (after.allowed, after.cached) == (False, False)
        assert pipeline.cache.stats.invalidations >= 2  # the first version, then the second
        assert asyncio.run(runtime.set_data("flags", {"x": 1}))  # data changes the version too
        assert not decide(pipeline, request("/a")).cached
    finally:
        runtime.close()


def test_caching_can_be_turned_off_by_the_policy_or_the_server(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, OUTCOMES, _dot_manifest='{"metadata": {"decision_cache": {"enabled": false}}}')
    try:
        pipeline = Pipeline(runtime)
        assert [decide(pipeline, request("/yes")).cached for _ in range(2)] == [False, False]
    finally:
        runtime.close()
    runtime = runtime_for(tmp_path / "b", OUTCOMES)
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_max_entries=0))
        assert [decide(pipeline, request("/yes")).cached for _ in range(2)] == [False, False]
    finally:
        runtime.close()


NARROW = """
package envoy.authz
import rego.v1
default allow := false
allow if input.attributes.request.http.method == "GET"
"""


def test_a_narrow_key_and_ttl_from_the_manifest(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, NARROW, _dot_manifest=json.dumps({"metadata": {"decision_cache": {
        "key": ["input.attributes.request.http.method"], "ttl": "2s"}}}))
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=60))
        assert not decide(pipeline, request("/a"), NOW).cached
        other_path = decide(pipeline, request("/b?x=1", headers={"x-anything": "1"}), NOW + 1)
        assert other_path.cached and other_path.allowed  # only the method is in the key
        post = decide(pipeline, request("/a", method="POST"), NOW + 1)
        assert (post.cached, post.allowed) == (False, False)
        assert not decide(pipeline, request("/c"), NOW + 2).cached  # the manifest's ttl, not the server's
    finally:
        runtime.close()


def _token(exp: float) -> str:
    return jwt.encode({"sub": "alice", "exp": int(exp)}, "secret", algorithm="HS256")


CLOCK = """
package envoy.authz
import rego.v1
default allow := false
allow if {
    time.now_ns() > 0
    object.get(input.attributes.request.http.headers, "authorization", "") != "Bearer forbidden"
}
"""


def test_clock_reading_policies_are_cached_briefly_and_never_past_the_tokens_exp(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, CLOCK)
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=60, clock_ttl=2))
        assert not decide(pipeline, request("/"), NOW).cached
        assert decide(pipeline, request("/"), NOW + 1.9).cached
        assert not decide(pipeline, request("/"), NOW + 2.0).cached  # clock_ttl, not cache_ttl

        bearer = {"authorization": f"Bearer {_token(NOW + 1)}"}
        assert not decide(pipeline, request("/t", headers=bearer), NOW).cached
        assert decide(pipeline, request("/t", headers=bearer), NOW + 0.9).cached
        assert not decide(pipeline, request("/t", headers=bearer), NOW + 1).cached  # the token's exp
        expired = {"authorization": f"Bearer {_token(NOW - 10)}"}
        assert [decide(pipeline, request("/t", headers=expired), NOW).cached for _ in range(2)] == [False, False]
    finally:
        runtime.close()


@pytest.mark.parametrize("payload", [b'{"exp": 1' + b"0" * 400 + b"}", b"[" * 6000 + b"]" * 6000,
                                     b'{"exp": "soon"}', b"\xff\xfe", b'{"exp": true}'],
                         ids=["huge-exp", "deep", "exp-text", "not-utf8", "exp-bool"])
def test_a_strange_bearer_token_only_means_no_exp(tmp_path: Path, payload: bytes) -> None:
    runtime = runtime_for(tmp_path, CLOCK)
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=60, clock_ttl=2))
        token = "e30." + base64.urlsafe_b64encode(payload).decode().rstrip("=") + ".c2ln"
        decision = decide(pipeline, request("/", headers={"authorization": f"Bearer {token}"}))
        assert (decision.allowed, decision.code) == (True, "allowed")
        assert decide(pipeline, request("/", headers={"authorization": f"Bearer {token}"}), NOW + 1).cached
    finally:
        runtime.close()


class Users:
    """An identity phase keyed on a header (a real IdentityResolver, for the tests)."""

    def __init__(self, expires_in: float | None = None) -> None:
        self.expires_in = expires_in

    async def resolve(self, facts: Facts, now: float) -> Identity:
        user = facts.header("x-test-user")
        if not user:
            return Identity({"method": "none", "user": None})
        expires = now + self.expires_in if self.expires_in is not None else None
        return Identity({"method": "session", "user": {"sub": user}}, fingerprint=user.encode(), expires_at=expires,
                        upstream_headers=(("x-authz-subject", user),))

    def still_valid(self, identity: Identity, now: float) -> bool:
        return identity.expires_at is None or identity.expires_at > now


USERS = """
package envoy.authz
import rego.v1
default allow := false
allow if input.identity.user.sub == "alice"
"""


def test_the_identity_is_part_of_the_key_and_its_expiry_caps_the_entry(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, USERS)
    try:
        pipeline = Pipeline(runtime, identity=Users(expires_in=1.0))
        alice, bob = {"x-test-user": "alice"}, {"x-test-user": "bob"}
        assert decide(pipeline, request("/", headers=alice)).allowed
        hit = decide(pipeline, request("/", headers=alice), NOW + 0.5)
        assert hit.cached and hit.upstream_headers == (("x-authz-subject", "alice"),)
        assert not decide(pipeline, request("/", headers=bob), NOW + 0.5).allowed
        assert not decide(pipeline, request("/", headers=alice), NOW + 1.0).cached  # the session ended
    finally:
        runtime.close()


# -- dry run and replay

def test_dry_run_allows_and_records_what_would_have_been_decided(outcomes: PolicyRuntime) -> None:
    pipeline = Pipeline(outcomes, settings=DecisionSettings(dry_run=True))
    would_deny = decide(pipeline, request("/legal"))
    assert (would_deny.allowed, would_deny.dry_run, would_deny.would_allow, would_deny.code) == (
        True, True, False, "policy_denied")
    response = CheckResponse.FromString(check_response_bytes(would_deny))
    assert response.status.code == 0 and response.HasField("ok_response")
    broken = decide(pipeline, request("/conflict"))
    assert (broken.allowed, broken.would_allow, broken.code) == (True, False, "policy_eval_error")
    would_allow = decide(pipeline, request("/yes"))
    assert (would_allow.allowed, would_allow.dry_run, would_allow.would_allow) == (True, True, True)
    # A request that cannot even be read is refused in dry-run too (as OPA-Envoy does).
    unreadable = decide(pipeline, request("/%zz"))
    assert (unreadable.allowed, unreadable.http_status, unreadable.dry_run) == (False, 400, False)


def test_dry_run_before_a_policy_loads(tmp_path: Path) -> None:
    pipeline = Pipeline(PolicyRuntime(str(tmp_path / "none")), settings=DecisionSettings(dry_run=True))
    decision = decide(pipeline, request("/"))
    assert (decision.allowed, decision.would_allow, decision.code) == (True, False, "policy_not_loaded")


def test_replay_answers_a_repeat_until_anything_could_have_changed(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, OUTCOMES)
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=5))
        decide(pipeline, request("/yes"))
        hit = decide(pipeline, request("/yes"), NOW + 1)
        again = pipeline.replay(hit, request("/yes"), now=NOW + 2)
        assert again is not None and again.allowed and again.cached
        assert again.decision_id != hit.decision_id and again.memo is hit.memo
        assert pipeline.replay(hit, request("/yes"), now=NOW + 5) is None  # the entry's deadline
        assert pipeline.replay(decide(pipeline, request("/yes"), NOW + 6), request("/yes"), now=NOW + 6) is None
        write_policy(tmp_path, OUTCOMES + "\n# a new version\n")
        assert asyncio.run(runtime.reload())
        assert pipeline.replay(hit, request("/yes"), now=NOW + 2) is None  # another policy version
        dry = Pipeline(runtime, settings=DecisionSettings(dry_run=True))
        decide(dry, request("/yes"))
        replayed = dry.replay(decide(dry, request("/yes")), request("/yes"), now=NOW)
        assert replayed is not None and (replayed.dry_run, replayed.would_allow) == (True, True)
    finally:
        runtime.close()


def test_observers_see_every_decision(outcomes: PolicyRuntime) -> None:
    seen: list[tuple[str, bool]] = []
    pipeline = Pipeline(outcomes, observers=[lambda d, f, now: seen.append((d.code, f is not None))])
    decide(pipeline, request("/yes"))
    decide(pipeline, request("/no"))
    from authz_server.errors import RequestError

    pipeline.refuse(RequestError("x", code="malformed_request"), now=NOW)
    assert seen == [("allowed", True), ("policy_denied", True), ("malformed_request", False)]


# -- the property: a cached decision is the decision

PROPERTY_POLICY = """
package envoy.authz
import rego.v1

default allow := false

http := input.attributes.request.http

token_ok if {
    [_, encoded] := split(http.headers.authorization, " ")
    [valid, _, _] := io.jwt.decode_verify(encoded, {"secret": "secret"})
    valid
}

allow := {"allowed": false, "http_status": 429, "body": "slow down", "reason": "rate_limited",
          "headers": {"retry-after": "1"}} if {
    "1" in input.parsed_query.burst
} else := {"allowed": true, "query_parameters_to_remove": ["debug"], "headers": {"x-admin": "yes"}} if {
    input.identity.user.sub == "admin"
} else := {"allowed": true, "headers": {"x-user": object.get(input.identity, ["user", "sub"], "anonymous")},
           "dynamic_metadata": {"route": input.parsed_path[0]}} if {
    http.method == "GET"
    input.parsed_path[0] in {"public", "docs"}
} else := true if {
    http.method == "POST"
    input.parsed_path[0] == "orders"
    input.parsed_body.amount < data.limits[input.attributes.contextExtensions.tier]
    http.headers["x-role"] == "buyer"
} else := {"allowed": true, "response_headers_to_add": {"x-token": "ok"}} if {
    input.parsed_path[0] == "secure"
    token_ok
} else := {"allowed": false, "http_status": 404} if {
    input.parsed_path[0] == "hidden"
}
"""

TOKENS = ["", f"Bearer {_token(4_000_000_000)}", f"Bearer {_token(1_600_000_000)}", "Bearer not.a.token"]

FIELDS: dict[str, list[Any]] = {
    "method": ["GET", "POST", "DELETE"],
    "path": ["/public", "/docs/a", "/orders", "/secure", "/hidden", "/other", "/public?burst=1",
             "/orders?burst=0&debug=1", "/%zz"],
    "role": ["", "buyer", "seller"],
    "session": ["", "s1", "s2"],
    "token": TOKENS,
    "tier": ["", "gold", "basic"],
    "amount": [None, 5, 50, 500, "x"],
}
cases = st.fixed_dictionaries({name: st.sampled_from(values) for name, values in FIELDS.items()})


def _variants(base: dict[str, Any]) -> st.SearchStrategy[list[dict[str, Any]]]:
    """The base request and a few that differ from it in one field: the requests a cache key
    that left that field out would confuse."""
    one_change = st.sampled_from(sorted(FIELDS)).flatmap(
        lambda name: st.sampled_from(FIELDS[name]).map(lambda value: {**base, name: value}))
    return st.lists(one_change, max_size=3).map(lambda changed: [base, *changed])


# Per request: its own noise, a clock that moves on (entries are hit, expire and come back),
# and now and then a session bound to another user (the identity changes, the request does not).
noise = st.fixed_dictionaries({
    "request_id": st.text("0123456789abcdef", min_size=1, max_size=8),
    "port": st.integers(1, 65535),
    "advance": st.sampled_from([0.0, 0.0, 0.0, 0.2, 0.6, 2.5]),
    "rebind": st.sampled_from([None, None, None, None, ("s1", "alice"), ("s1", "admin"), ("s2", "bob"),
                               ("s2", "admin")]),
})
runs = cases.flatmap(_variants).flatmap(
    lambda distinct: st.lists(st.tuples(st.sampled_from(distinct), noise), min_size=1, max_size=12))


class Sessions:
    """Sessions by id, as a session store holds them (a real IdentityResolver over a dict)."""

    def __init__(self) -> None:
        self.users = {"s1": "alice", "s2": "bob"}

    async def resolve(self, facts: Facts, now: float) -> Identity:
        session = facts.header("x-session-id")
        if session not in self.users:
            return Identity({"method": "none", "user": None})
        document = {"method": "session", "user": {"sub": self.users[session]}}
        return Identity(document, fingerprint=json.dumps(document, sort_keys=True).encode(), expires_at=now + 3,
                        upstream_headers=(("x-authz-subject", self.users[session]),))


def _check_request(case: dict[str, Any], noise: dict[str, Any]) -> Facts:
    headers = {"x-request-id": noise["request_id"], "traceparent": f"00-{noise['request_id']}-01"}
    for name, key in (("x-role", "role"), ("x-session-id", "session"), ("authorization", "token")):
        if case[key]:
            headers[name] = case[key]
    body = ""
    if case["amount"] is not None:
        body = json.dumps({"amount": case["amount"]})
        headers["content-type"] = "application/json"
    extra: dict[str, Any] = {"source": {"address": {"socketAddress": {"address": "10.0.0.1",
                                                                      "portValue": noise["port"]}}}}
    if case["tier"]:
        extra["contextExtensions"] = {"tier": case["tier"]}
    return request(case["path"], case["method"], headers, body, **extra)


def _as_envoy_sees_it(decision: Decision) -> CheckResponse:
    response = CheckResponse.FromString(check_response_bytes(decision))
    for headers in (response.ok_response.headers, response.denied_response.headers):
        kept = [h for h in headers if h.header.key != DECISION_ID_HEADER]
        del headers[:]
        headers.extend(kept)
    if "decision_id" in response.dynamic_metadata:
        del response.dynamic_metadata["decision_id"]
    response.denied_response.body = response.denied_response.body.replace(decision.decision_id, "")
    return response


@pytest.fixture(scope="module")
def property_pipelines(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("property")
    write_policy(folder, PROPERTY_POLICY)
    write_policy(folder, json.dumps({"limits": {"gold": 100, "basic": 10}}), "data.json")
    runtime = PolicyRuntime(str(folder), isolation="inline")
    runtime.load()
    loop = asyncio.new_event_loop()
    sessions = Sessions()  # one store behind both pipelines, as behind every replica
    cached = Pipeline(runtime, identity=sessions, settings=DecisionSettings(cache_ttl=2.0, clock_ttl=1.0))
    uncached = Pipeline(runtime, identity=sessions, settings=DecisionSettings(cache_max_entries=0))
    clock = [NOW]
    yield loop, cached, uncached, clock, sessions
    assert cached.cache.stats.hits > 100, f"the property hardly exercised the cache: {cached.cache.stats}"
    loop.close()
    runtime.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(run=runs)
def test_cached_and_uncached_decisions_are_always_equal(property_pipelines, run) -> None:  # type: ignore[no-untyped-def]
    loop, cached, uncached, clock, sessions = property_pipelines
    for case, extra in run:
        clock[0] += extra["advance"]
        if extra["rebind"] is not None:
            session, user = extra["rebind"]
            sessions.users[session] = user
        fast = loop.run_until_complete(cached.decide(_check_request(case, extra), now=clock[0]))
        slow = loop.run_until_complete(uncached.decide(_check_request(case, extra), now=clock[0]))
        assert not slow.cached
        assert (fast.allowed, fast.code, fast.http_status, fast.phase) == (
            slow.allowed, slow.code, slow.http_status, slow.phase), case
        assert _as_envoy_sees_it(fast) == _as_envoy_sees_it(slow), case
        # Once rendered, a cached allow answers from its memo: the same bytes again.
        assert _as_envoy_sees_it(fast) == _as_envoy_sees_it(fast)
