"""Properties of the decision cache, through the real pipeline and the real Rego engine.

The policies here echo every input value they read into a response header, so a cached
answer given to the wrong request is visible as a wrong header, not only as a cache-hit
counter. Properties:

* two requests that differ in anything the policy reads never share a decision, and every
  answer equals the one an uncached pipeline gives;
* requests that differ only in what the policy does not read (per-request noise such as
  the request id, tracing headers, time and source port, other headers, signal fields)
  share one: the key is the input the policy reads (``policy.inputs``), by default as with a
  key declared in the manifest;
* a policy that does name a per-request field is keyed on it;
* an entry lives exactly its TTL; the cache never holds more than its bound and evicts
  the least recently used;
* a policy reload or a data change invalidates: no answer reflects the old set;
* a request sent again finds its entry by the request alone (``ReadKeys``) and gets its own
  answer, never the answer of a request that shares the entry's key but not the request.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server.decision import DECISION_ID_HEADER, Decision, DecisionSettings, Identity, Pipeline
from authz_server.envoy import CheckResponse, check_request_from_json, check_response, facts_from_check_request
from authz_server.facts import Facts
from authz_server.decisioncache import DecisionCache
from authz_server.policy.inputs import input_paths
from authz_server.trees import leaf_paths
from authz_server.policy.loader import PolicyRuntime
from tests.support.authz import write_policy

NOW = 1_700_000_000.0
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- the request model: every field, and whether the policy below reads it

ECHO = """
package envoy.authz
import rego.v1

default role := ""
role := input.attributes.request.http.headers["x-role"]

default tier := ""
tier := input.attributes.contextExtensions.tier

default q := []
q := input.parsed_query.q

default sub := ""
sub := input.identity.user.sub

default limited := false
limited := input.signals.rate.limited

seen := [input.attributes.request.http.method, concat("/", input.parsed_path), concat(",", q), role, tier, sub,
         limited]

default allowed := false
allowed if {
    not limited
    role != "blocked"
}

allow := {"allowed": allowed, "headers": {"x-seen": json.marshal(seen)}}
"""

DOMAINS: dict[str, list[Any]] = {
    # read by ECHO
    "method": ["GET", "POST"],
    "path": ["/a", "/b/c", "/"],
    "q": [None, "1", "2"],
    "role": [None, "admin", "blocked"],
    "tier": [None, "gold", "basic"],
    "user": [None, "alice", "bob"],
    "limited": [False, True],
    # not read by ECHO
    "z": [None, "x", "y"],
    "other": [None, "1", "2"],
    "zone": [None, "eu", "us"],
    "principal": [None, "spiffe://example.org/a", "spiffe://example.org/b"],
    "host": ["", "a.example", "b.example"],
    "observed": [0.0, 3.5, 99.0],
    # per-request noise
    "request_id": ["r1", "r2", "r3"],
    "traceparent": [None, "00-aa-01", "00-bb-01"],
    "port": [1000, 2000, 3000],
    "http_id": ["", "1", "2"],
    "time": [None, "2024-01-01T00:00:00Z", "2024-01-01T00:00:07Z"],
}
READ = {"method", "path", "q", "role", "tier", "user", "limited"}
UNREAD = {"z", "other", "zone", "principal", "host"}
UNREAD_SIGNALS = {"observed"}
VOLATILE = {"request_id", "traceparent", "port", "http_id", "time"}
assert READ | UNREAD | UNREAD_SIGNALS | VOLATILE == set(DOMAINS)


def check_request(model: Mapping[str, Any]) -> Facts:
    """The CheckRequest Envoy would send for ``model`` (identity and signals live outside it)."""
    query = "&".join(f"{name}={model[name]}" for name in ("q", "z") if model[name] is not None)
    headers = {"x-request-id": model["request_id"]}
    for name, field in (("x-role", "role"), ("x-other", "other"), ("traceparent", "traceparent")):
        if model[field] is not None:
            headers[name] = model[field]
    http: dict[str, Any] = {"method": model["method"], "path": model["path"] + (f"?{query}" if query else ""),
                            "headers": headers, "host": model["host"]}
    if model["http_id"]:
        http["id"] = model["http_id"]
    request: dict[str, Any] = {"http": http}
    if model["time"] is not None:
        request["time"] = model["time"]
    source: dict[str, Any] = {"address": {"socketAddress": {"address": "10.0.0.1", "portValue": model["port"]}}}
    if model["principal"] is not None:
        source["principal"] = model["principal"]
    context = {name: model[name] for name in ("tier", "zone") if model[name] is not None}
    attributes: dict[str, Any] = {"request": request, "source": source}
    if context:
        attributes["contextExtensions"] = context
    return facts_from_check_request(check_request_from_json({"attributes": attributes}))


def expected_seen(model: Mapping[str, Any]) -> list[Any]:
    return [model["method"], model["path"].lstrip("/"), model["q"] or "", model["role"] or "", model["tier"] or "",
            model["user"] or "", model["limited"]]


class World:
    """What the pipeline asks besides the request: who the caller is (a session store the
    test rebinds) and the signals (a rate limiter whose state moves between requests)."""

    def __init__(self) -> None:
        self.user: str | None = None
        self.signals: dict[str, Any] = {"rate": {"limited": False, "observed": 0.0}}

    def set(self, model: Mapping[str, Any]) -> None:
        self.user = model["user"]
        self.signals = {"rate": {"limited": model["limited"], "observed": model["observed"]}}

    # IdentityResolver
    async def resolve(self, facts: Facts, now: float) -> Identity:
        document = {"method": "session" if self.user else "none", "user": {"sub": self.user} if self.user else None}
        return Identity(document, fingerprint=json.dumps(document, sort_keys=True).encode())

    # SignalSource
    def gate(self, facts: Facts, now: float) -> None:
        return None

    async def record_identity_failure(self, facts: Facts, now: float) -> None:
        return None

    async def assess(self, facts: Facts, identity: Identity, now: float) -> Mapping[str, Any]:
        return json.loads(json.dumps(self.signals))

    def record_outcome(self, facts: Facts, identity: Identity, decision: Decision, now: float) -> None:
        return None


def as_envoy_sees_it(decision: Decision) -> CheckResponse:
    """The CheckResponse without what differs per decision (its id)."""
    response = check_response(decision)
    for headers in (response.ok_response.headers, response.denied_response.headers):
        kept = [h for h in headers if h.header.key != DECISION_ID_HEADER]
        del headers[:]
        headers.extend(kept)
    del response.dynamic_metadata["decision_id"]
    response.denied_response.body = response.denied_response.body.replace(decision.decision_id, "")
    return response


def seen_header(decision: Decision) -> Any:
    response = check_response(decision)
    part = response.ok_response if decision.allowed else response.denied_response
    return json.loads(next(h.header.value for h in part.headers if h.header.key == "x-seen"))


def load(folder: Path, source: str, **files: str) -> PolicyRuntime:
    write_policy(folder, source)
    for name, text in files.items():
        write_policy(folder, text, name)
    runtime = PolicyRuntime(str(folder), isolation="inline")
    runtime.load()
    return runtime


models = st.fixed_dictionaries({name: st.sampled_from(values) for name, values in DOMAINS.items()})


def with_changes(base: dict[str, Any]) -> st.SearchStrategy[tuple[dict[str, Any], dict[str, Any]]]:
    """``base`` and a request differing from it in one to three fields (any kind)."""
    fields = st.lists(st.sampled_from(sorted(DOMAINS)), min_size=1, max_size=3, unique=True)

    def change(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({n: st.sampled_from([v for v in DOMAINS[n] if v != base[n]]) for n in names})

    return fields.flatmap(change).map(lambda delta: (base, {**base, **delta}))


pairs = models.flatmap(with_changes)


# -- 1. what the policy reads is always in the key; noise never is

@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    folder = tmp_path_factory.mktemp("echo")
    runtime = load(folder, ECHO)
    # The key a user derives from the static analysis of what the policy reads.
    tree = input_paths(runtime.active.policy_set.serving_modules)
    assert tree is not None
    key = [".".join(("input", *path)) for path in leaf_paths(tree)]
    narrow_folder = tmp_path_factory.mktemp("echo-narrow")
    narrow = load(narrow_folder, ECHO, **{".manifest": json.dumps({"metadata": {"decision_cache": {"key": key}}})})
    world = World()
    loop = asyncio.new_event_loop()
    pipelines = {
        "default": Pipeline(runtime, identity=world, signals=world),
        "narrow": Pipeline(narrow, identity=world, signals=world),
        "uncached": Pipeline(runtime, identity=world, signals=world,
                             settings=DecisionSettings(cache_max_entries=0)),
    }
    yield loop, world, pipelines, key
    loop.close()
    runtime.close()
    narrow.close()


def test_the_declared_key_is_what_the_analysis_finds(echo: tuple[Any, ...]) -> None:
    *_, key = echo
    assert sorted(key) == sorted([
        "input.attributes.request.http.method", "input.attributes.request.http.headers.x-role",
        "input.attributes.contextExtensions.tier", "input.parsed_query.q", "input.parsed_path",
        "input.identity.user.sub", "input.signals.rate.limited"])


@settings(FAST, max_examples=150)
@given(pair=pairs)
def test_a_request_shares_a_decision_only_when_it_differs_in_nothing_the_policy_reads(
        echo: tuple[Any, ...], pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    loop, world, pipelines, _ = echo
    first, second = pair
    changed = {name for name in DOMAINS if first[name] != second[name]}
    shares = {"default": changed <= VOLATILE | UNREAD_SIGNALS | UNREAD,
              "narrow": changed <= VOLATILE | UNREAD_SIGNALS | UNREAD}
    for name in ("default", "narrow"):
        pipelines[name].cache.clear()
    for model in (first, second):
        world.set(model)
        truth = loop.run_until_complete(pipelines["uncached"].decide(check_request(model), now=NOW))
        assert not truth.cached and seen_header(truth) == expected_seen(model)
        for name in ("default", "narrow"):
            decision = loop.run_until_complete(pipelines[name].decide(check_request(model), now=NOW))
            assert seen_header(decision) == expected_seen(model), (name, changed)
            assert as_envoy_sees_it(decision) == as_envoy_sees_it(truth), (name, changed)
            if model is second:
                assert decision.cached == shares[name], (name, changed)
    # Each request again: found by the request itself (``ReadKeys``), never the other's answer.
    for model in (first, second, first):
        world.set(model)
        decision = loop.run_until_complete(pipelines["default"].decide(check_request(model), now=NOW))
        assert decision.cached and seen_header(decision) == expected_seen(model), changed


NAMES_NOISE = """
package envoy.authz
import rego.v1

default port := 0
port := input.attributes.source.address.socketAddress.portValue

default request_id := ""
request_id := input.attributes.request.http.headers["x-request-id"]

default trace := ""
trace := input.attributes.request.http.headers.traceparent

default http_id := ""
http_id := input.attributes.request.http.id

default seconds := 0
seconds := input.attributes.request.time.seconds

allow := {"allowed": port != 3000, "headers": {"x-seen": json.marshal([port, request_id, trace, http_id, seconds])}}
"""


def expected_noise(model: Mapping[str, Any]) -> list[Any]:
    seconds = {None: 0, "2024-01-01T00:00:00Z": 1704067200, "2024-01-01T00:00:07Z": 1704067207}[model["time"]]
    return [model["port"], model["request_id"], model["traceparent"] or "", model["http_id"], seconds]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    runtime = load(tmp_path_factory.mktemp("noisy"), NAMES_NOISE)
    loop = asyncio.new_event_loop()
    yield loop, Pipeline(runtime), Pipeline(runtime, settings=DecisionSettings(cache_max_entries=0))
    loop.close()
    runtime.close()


@settings(FAST, max_examples=60)
@given(pair=pairs)
def test_a_policy_that_names_a_per_request_field_is_keyed_on_it(
        noisy: tuple[Any, ...], pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Request id, tracing headers, time and port are left out of the default key only
    while the policy does not read them: one that checks the client's port must not get
    the answer given to another port."""
    loop, cached, uncached = noisy
    first, second = pair
    cached.cache.clear()
    for model in (first, second):
        decision = loop.run_until_complete(cached.decide(check_request(model), now=NOW))
        truth = loop.run_until_complete(uncached.decide(check_request(model), now=NOW))
        assert seen_header(decision) == expected_noise(model)
        assert as_envoy_sees_it(decision) == as_envoy_sees_it(truth)
        assert decision.allowed == (model["port"] != 3000)
    # This policy reads the per-request fields and nothing else: it is keyed on them alone.
    changed = {name for name in DOMAINS if first[name] != second[name]}
    assert decision.cached == changed.isdisjoint(VOLATILE), changed


# -- 2. time: an entry lives exactly its TTL

SIMPLE = """
package envoy.authz
import rego.v1
default allow := false
allow if input.parsed_path[0] == "yes"
"""


@pytest.fixture(scope="module")
def simple(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, PolicyRuntime, Path]]:
    folder = tmp_path_factory.mktemp("simple")
    runtime = load(folder, SIMPLE)
    loop = asyncio.new_event_loop()
    yield loop, runtime, folder
    loop.close()
    runtime.close()


def plain(path: str) -> Facts:
    return facts_from_check_request(check_request_from_json(
        {"attributes": {"request": {"http": {"method": "GET", "path": path, "headers": {}}}}}))


@settings(FAST, max_examples=60)
@given(ttl=st.floats(0.01, 600, allow_nan=False), later=st.lists(st.floats(0, 1200, allow_nan=False), max_size=6))
def test_an_entry_answers_until_its_ttl_and_not_a_moment_after(simple: tuple[Any, ...], ttl: float,
                                                                later: list[float]) -> None:
    loop, runtime, _ = simple
    pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=ttl))
    stored_at = NOW
    assert not loop.run_until_complete(pipeline.decide(plain("/yes"), now=NOW)).cached
    for offset in sorted(later):
        now = NOW + offset
        decision = loop.run_until_complete(pipeline.decide(plain("/yes"), now=now))
        assert decision.allowed
        if now < stored_at + ttl:
            assert decision.cached and decision.valid_until == stored_at + ttl
        else:
            assert not decision.cached  # expired: asked the policy again, and stored anew
            stored_at = now


def test_the_manifest_ttl_wins_over_the_servers(tmp_path: Path) -> None:
    runtime = load(tmp_path, SIMPLE, **{".manifest": '{"metadata": {"decision_cache": {"ttl": "3s"}}}'})
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=600))
        decide = lambda now: asyncio.run(pipeline.decide(plain("/yes"), now=now))  # noqa: E731
        assert [decide(NOW).cached, decide(NOW + 2.999).cached, decide(NOW + 3).cached] == [False, True, False]
    finally:
        runtime.close()


# -- 3. size: bounded, least recently used goes first

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 9), st.floats(0.5, 20)),
    st.tuples(st.just("get"), st.integers(0, 9), st.just(0.0)),
    st.tuples(st.just("tick"), st.just(0), st.floats(0, 10)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(bound=st.integers(0, 5), script=ops)
def test_the_cache_is_bounded_lru_and_never_returns_an_expired_entry(bound: int, script: list[Any]) -> None:
    cache: DecisionCache[str] = DecisionCache(bound)
    now = 0.0
    model: dict[int, tuple[float, str]] = {}  # key -> (deadline, value), in least-recently-used order
    for step, (op, key, amount) in enumerate(script):
        if op == "tick":
            now += amount
        elif op == "put":
            value = f"v{step}"
            cache.put(b"%d" % key, value, now + amount, now)
            model.pop(key, None)
            if bound:
                model[key] = (now + amount, value)
                while len(model) > bound:
                    del model[next(iter(model))]
        else:
            got = cache.get(b"%d" % key, now)
            entry = model.pop(key, None)
            if entry is not None and entry[0] > now:
                assert got == entry[1]
                model[key] = entry  # used: now the most recent
            else:
                assert got is None  # never stored, evicted, or past its deadline
        assert len(cache) <= bound
        assert len(cache) == len(model) or any(deadline <= now for deadline, _ in model.values())


class _Answer:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


def test_a_full_cache_holds_no_garbage_collected_object_of_its_own_per_entry() -> None:
    """On traffic that does not repeat the cache fills up with long-lived entries, and a full
    collection walks every tracked object while the event loop waits: an entry is its value,
    nothing more for the collector (a deadline and value tuple per entry doubled it)."""
    import gc

    cache: DecisionCache[_Answer] = DecisionCache(5_000)
    answers = [_Answer(n) for n in range(6_000)]
    gc.collect()
    before = len(gc.get_objects())
    for n, answer in enumerate(answers):
        cache.put(b"%d" % n, answer, 100.0 + n, 0.0)
    assert len(cache) == 5_000 and cache.get(b"0", 1.0) is None and cache.get(b"5999", 1.0) is answers[-1]
    assert len(gc.get_objects()) - before < 100
    cache.clear()
    assert cache.get(b"5999", 1.0) is None


def test_a_true_or_false_answer_is_one_shared_verdict() -> None:
    from authz_server.response import read_result

    assert read_result(True) is read_result(True) and read_result(False) is read_result(False)
    assert read_result(True).allowed and not read_result(False).allowed


@settings(FAST, max_examples=25)
@given(bound=st.integers(1, 8), count=st.integers(1, 20), data=st.data())
def test_the_pipeline_cache_holds_its_bound_and_answers_the_recent_requests(
        simple: tuple[Any, ...], bound: int, count: int, data: st.DataObject) -> None:
    loop, runtime, _ = simple
    pipeline = Pipeline(runtime, settings=DecisionSettings(cache_max_entries=bound))
    paths = [f"/{'yes' if i % 2 else 'no'}/{i}" for i in range(count)]
    for path in paths:
        loop.run_until_complete(pipeline.decide(plain(path), now=NOW))
        assert len(pipeline.cache) <= bound
    assert pipeline.cache.stats.evictions == max(0, count - bound)
    index = data.draw(st.integers(0, count - 1))
    decision = loop.run_until_complete(pipeline.decide(plain(paths[index]), now=NOW))
    assert decision.cached == (index >= count - bound)  # the last `bound` are kept, older ones evicted
    assert decision.allowed == bool(index % 2)


# -- 4. a new policy or new data: nothing cached survives

LIMITS = """
package envoy.authz
import rego.v1
default allow := false
allow := {"allowed": true, "headers": {"x-limit": sprintf("%v", [data.limits.max]), "x-rev": "REV"}} if {
    input.parsed_path[0] == "yes"
}
"""

changes = st.lists(st.one_of(
    st.tuples(st.just("decide"), st.sampled_from(["/yes", "/yes/again", "/no"])),
    st.tuples(st.just("data"), st.integers(0, 3)),
    st.tuples(st.just("policy"), st.sampled_from(["a", "b"])),
), min_size=1, max_size=8)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(script=changes)
def test_after_a_reload_or_a_data_change_no_answer_reflects_the_old_set(tmp_path_factory: pytest.TempPathFactory,
                                                                          script: list[Any]) -> None:
    folder = tmp_path_factory.mktemp("limits")
    runtime = load(folder, LIMITS.replace("REV", "a"), **{"data.json": '{"limits": {"max": 0}}'})
    loop = asyncio.new_event_loop()
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=3600))
        current = {"rev": "a", "max": 0}
        for op, value in script:
            if op == "data":
                loop.run_until_complete(runtime.set_data("limits", {"max": value}))
                current["max"] = value
            elif op == "policy":
                write_policy(folder, LIMITS.replace("REV", value))
                loop.run_until_complete(runtime.reload())
                current["rev"] = value
            else:
                for _ in range(2):  # the second is a hit unless something changed in between
                    decision = loop.run_until_complete(pipeline.decide(plain(value), now=NOW))
                    assert decision.policy_version == runtime.active.version
                    if value == "/no":
                        assert not decision.allowed
                        continue
                    headers = dict(decision.upstream_headers)
                    assert (headers["x-limit"], headers["x-rev"]) == (str(current["max"]), current["rev"])
    finally:
        loop.close()
        runtime.close()


def test_a_reload_empties_the_cache_even_for_identical_requests(tmp_path: Path) -> None:
    runtime = load(tmp_path, SIMPLE)
    try:
        pipeline = Pipeline(runtime, settings=DecisionSettings(cache_ttl=3600))
        assert [asyncio.run(pipeline.decide(plain("/yes"), now=NOW)).cached for _ in range(2)] == [False, True]
        old = runtime.active.version
        write_policy(tmp_path, SIMPLE.replace('"yes"', '"no"'))
        assert asyncio.run(runtime.reload()) and runtime.active.version != old
        after = asyncio.run(pipeline.decide(plain("/yes"), now=NOW))
        assert (after.allowed, after.cached, after.policy_version) == (False, False, runtime.active.version)
        assert len(pipeline.cache) == 1  # only the new version's answer
        asyncio.run(runtime.set_data("anything", {"x": 1}))
        assert not asyncio.run(pipeline.decide(plain("/yes"), now=NOW)).cached
    finally:
        runtime.close()
