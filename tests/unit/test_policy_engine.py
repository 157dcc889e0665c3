"""The Rego engine behind the decisions (OPA, through our seam): compile errors with their
place, evaluation errors and bad inputs translated into our errors, OPA's default for failing
built-ins, and the evaluator pool's deadline and isolation."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from authz_server.config import load_config
from authz_server.errors import PolicyError, RequestError
from authz_server.policy import engine as engine_module
from authz_server.policy.engine import UNDEFINED, CompiledPolicy, encode_input, validate_query
from authz_server.policy.loader import default_pool_size
from authz_server.policy.pool import EvaluatorPool
from authz_server.policy.source import load_policy_set
from tests.support.authz import write_policy

QUERY = "data.envoy.authz.allow"

# Slow on purpose and in little memory: input.n squared steps (n=1000: about a second here, a few
# on a busy machine); quick for small n.
SLOW = """package envoy.authz
import rego.v1
default allow := false
allow if input.n < 100
allow if {
    some i in numbers.range(1, input.n)
    some j in numbers.range(1, input.n)
    i * j == -1
}
"""
STUCK = {"n": 1000}  # far longer than the deadlines below


def compiled(tmp_path: Path, source: str, query: str = QUERY, *, strict: bool = False) -> CompiledPolicy:
    write_policy(tmp_path, source)
    return CompiledPolicy.compile(load_policy_set(tmp_path), query, strict=strict)


def evaluate(policy: CompiledPolicy, document: object) -> object:
    evaluator = policy.new_evaluator()
    try:
        return evaluator.evaluate(encode_input(document))
    finally:
        evaluator.close()


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    write_policy(tmp_path, "package envoy.authz\nimport rego.v1\n\nallow if {\n    input.x ==\n}\n", "authz.rego")
    write_policy(tmp_path, "package lib\n", "lib.rego")
    with pytest.raises(PolicyError) as error:
        CompiledPolicy.compile(load_policy_set(tmp_path), QUERY)
    assert error.value.code == "policy_compile_error"
    assert error.value.message.startswith("authz.rego:6: rego_parse_error:")
    assert "\n" not in error.value.message


def test_type_errors_and_unknown_functions_are_caught_at_compile_time(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as error:
        compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow if nope(input.x)\n")
    assert (error.value.code, error.value.message) == (
        "policy_compile_error", "policy.rego:3: rego_type_error: undefined function nope")


def test_rego_v0_syntax_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as error:
        compiled(tmp_path, "package envoy.authz\ndefault allow = false\nallow { input.x }\n")
    assert "`if` keyword is required" in error.value.message


def test_future_keywords_imports_still_compile(tmp_path: Path) -> None:
    policy = compiled(tmp_path, "package envoy.authz\nimport future.keywords.if\nimport future.keywords.in\n"
                                "import future.keywords.every\nallow if every x in input.xs { x > 0 }\n")
    assert evaluate(policy, {"xs": [1, 2]}) is True


@pytest.mark.parametrize("query", ["allow", "data.", "data.envoy.authz.allow; true", "data.x with input as 1",
                                   "input.x", "data.envoy[authz]"])
def test_only_data_references_are_queries(query: str) -> None:
    with pytest.raises(PolicyError) as error:
        validate_query(query)
    assert error.value.code == "policy_query_invalid"


def test_data_references_are_queries() -> None:
    for query in (QUERY, 'data["envoy"].authz.allow', "data.x_1.y"):
        assert validate_query(query) == query


def test_values_false_and_undefined_are_told_apart(tmp_path: Path) -> None:
    policy = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow := {\"allowed\": true, \"n\": input.n} "
                                "if input.n > 1\nallow := false if input.n == 1\n")
    assert evaluate(policy, {"n": 2}) == {"allowed": True, "n": 2}
    assert evaluate(policy, {"n": 1}) is False
    assert evaluate(policy, {"n": 0}) is UNDEFINED


def test_a_query_with_quoted_keys(tmp_path: Path) -> None:
    write_policy(tmp_path, 'package my_app\nimport rego.v1\nrules["allow-it"] := input.ok\n')
    policy = CompiledPolicy.compile(load_policy_set(tmp_path), 'data.my_app.rules["allow-it"]')
    assert evaluate(policy, {"ok": True}) is True


def test_a_conflict_is_an_evaluation_error_and_the_evaluator_stays_good(tmp_path: Path) -> None:
    evaluator = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow := true if input.a\n"
                                   "allow := false if input.b\n").new_evaluator()
    try:
        assert evaluator.evaluate(encode_input({"a": True})) is True
        with pytest.raises(PolicyError) as error:
            evaluator.evaluate(encode_input({"a": True, "b": True}))
        assert error.value.code == "policy_eval_error" and "eval_conflict_error" in error.value.message
        assert evaluator.evaluate(encode_input({"b": True})) is False
    finally:
        evaluator.close()


def test_strings_arrive_exactly_as_sent(tmp_path: Path) -> None:
    policy = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow := {\"same\": input.s == "
                                "\"a\\\"b\\\\c\\nd\\u0000é\", \"back\": input.s, \"n\": count(input.s), "
                                "\"key\": object.keys(input.o)}\n")
    text = 'a"b\\c\nd\x00é'
    assert evaluate(policy, {"s": text, "o": {text: 1}}) == {"same": True, "back": text, "n": 9, "key": [text]}


def test_data_strings_match_input_strings(tmp_path: Path) -> None:
    write_policy(tmp_path, "package envoy.authz\nimport rego.v1\nallow if input.name in data.names\n")
    (tmp_path / "data.json").write_text(json.dumps({"names": ["José", 'say "hi"', "\u00e9t\u00e9"]}), encoding="utf-8")
    policy = CompiledPolicy.compile(load_policy_set(tmp_path), QUERY)
    assert evaluate(policy, {"name": "José"}) is True
    assert evaluate(policy, {"name": 'say "hi"'}) is True
    assert evaluate(policy, {"name": "été"}) is True
    assert evaluate(policy, {"name": "Jose"}) is UNDEFINED


def test_large_numbers_keep_their_value(tmp_path: Path) -> None:
    policy = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow := input.n + 1\n")
    assert evaluate(policy, {"n": 2**63}) == 2**63 + 1
    assert evaluate(policy, {"n": 1.5}) == 2.5


@pytest.mark.parametrize("document", [
    {"a": "\udcff"}, {"a": float("nan")}, {"a": float("inf")}, {"a": b"bytes"}, {"a": {1, 2}},
], ids=["surrogate", "nan", "inf", "bytes", "set"])
def test_input_json_cannot_carry_is_a_request_error(document: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(RequestError) as error:
        encode_input(document)
    assert error.value.code == "bad_request"


# -- built-in errors: OPA's default (undefined) unless strict

CIDR = """package envoy.authz
import rego.v1
default allow := false
deny contains "blocked" if net.cidr_contains(input.blocked, input.ip)
allow if {
	count(deny) == 0
	startswith(input.path, "/public")
}
"""


def test_a_failing_builtin_makes_its_expression_undefined_as_in_opa(tmp_path: Path) -> None:
    policy = compiled(tmp_path, CIDR)
    assert evaluate(policy, {"blocked": "10.0.0.0/8", "ip": "10.1.2.3", "path": "/public/a"}) is False
    # net.cidr_contains fails on a CIDR that is not one: `deny` stays empty, as OPA answers
    assert evaluate(policy, {"blocked": "not-a-cidr", "ip": "10.1.2.3", "path": "/public/a"}) is True
    # startswith(5, ...) fails: `allow` falls back to its default
    assert evaluate(policy, {"blocked": "10.0.0.0/8", "ip": "192.0.2.1", "path": 5}) is False
    assert len(policy.sites.sites) == 2
    # the wrapped site still answers like the built-in when it works
    assert evaluate(policy, {"blocked": "10.0.0.0/8", "ip": "10.1.2.3", "path": "/public/a"}) is False
    assert evaluate(policy, {"blocked": "10.0.0.0/8", "ip": "192.0.2.1", "path": "/public/a"}) is True


def test_strict_builtin_errors_make_the_evaluation_fail(tmp_path: Path) -> None:
    policy = compiled(tmp_path, CIDR, strict=True)
    with pytest.raises(PolicyError) as error:
        evaluate(policy, {"blocked": "not-a-cidr", "ip": "10.1.2.3", "path": "/public/a"})
    assert error.value.code == "policy_eval_error" and "net.cidr_contains" in error.value.message


def test_a_wrapped_builtin_still_returns_sets_and_takes_them(tmp_path: Path) -> None:
    policy = compiled(tmp_path, "package envoy.authz\nimport rego.v1\n"
                                "allow := {\"keys\": count(k), \"has_a\": \"a\" in k, \"both\": count(k & {\"a\", \"z\"})} "
                                "if k := object.keys(input.o)\n")
    assert evaluate(policy, {"o": 5}) is UNDEFINED  # object.keys fails on a number: wrapped from now on
    assert policy.sites.sites
    assert evaluate(policy, {"o": {"a": 1, "b": 2}}) == {"keys": 2, "has_a": True, "both": 1}


def test_an_error_that_is_not_a_builtins_stays_an_error(tmp_path: Path) -> None:
    policy = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nx := 1 if input.a\nx := 2 if input.b\n"
                                "allow if x == 1\n")
    with pytest.raises(PolicyError):
        evaluate(policy, {"a": True, "b": True})
    assert not policy.sites.sites


def test_an_engine_loaded_before_a_fork_refuses_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow := true\n")
    monkeypatch.setattr(engine_module, "_ENGINE_PID", -1)  # as a forked child sees it
    with pytest.raises(PolicyError) as error:
        policy.new_evaluator()
    assert error.value.code == "policy_engine_fork"


# -- the pool

async def test_a_slow_evaluation_is_denied_at_its_deadline_and_the_pool_keeps_serving(tmp_path: Path) -> None:
    timeouts: list[int] = []
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, spare=1, on_timeout=lambda: timeouts.append(1))
    try:
        assert await pool.evaluate(encode_input({"n": 10}), timeout=10) is True
        started = time.monotonic()
        with pytest.raises(PolicyError) as error:
            await pool.evaluate(encode_input(STUCK), timeout=0.05)
        assert error.value.code == "policy_timeout"
        assert time.monotonic() - started < 0.9  # at the deadline, not when the engine finishes (seconds)
        assert timeouts == [1]
        # The stuck worker was replaced: the pool answers while the stuck evaluation still runs.
        assert await pool.evaluate(encode_input({"n": 10}), timeout=10) is True
        assert pool.stats() == {"workers": 2, "stuck": 1}
    finally:
        pool.close()


async def test_with_every_spare_stuck_new_work_waits_and_denies_at_its_deadline(tmp_path: Path) -> None:
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, spare=0)
    try:
        with pytest.raises(PolicyError):
            await pool.evaluate(encode_input(STUCK), timeout=0.05)
        with pytest.raises(PolicyError) as busy:
            await pool.evaluate(encode_input({"n": 10}), timeout=0.05)
        assert busy.value.code == "policy_timeout"
        # the worker comes back when its evaluation ends (seconds), and serves again
        assert await pool.evaluate(encode_input({"n": 10}), timeout=60) is True
    finally:
        pool.close()


async def test_stuck_evaluations_never_starve_the_rest_of_the_traffic(tmp_path: Path) -> None:
    """Issue 23: a few expensive inputs held every evaluator and unrelated requests timed out.
    Here the one worker and two more jobs get stuck for seconds; twenty small evaluations are
    still answered well inside a deadline far shorter than that (by the replacements)."""
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, spare=8)
    try:
        stuck = await asyncio.gather(*(pool.evaluate(encode_input({"n": 1200}), timeout=0.1) for _ in range(3)),
                                     return_exceptions=True)
        assert all(isinstance(e, PolicyError) and e.code == "policy_timeout" for e in stuck), stuck
        fast = await asyncio.gather(*(pool.evaluate(encode_input({"n": i % 50}), timeout=1.5) for i in range(20)))
        assert fast == [True] * 20
    finally:
        pool.close()


async def test_evaluations_run_side_by_side_on_the_pool_threads(tmp_path: Path) -> None:
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=2)
    try:
        results = await asyncio.gather(*(pool.evaluate(encode_input({"n": 10 + i}), timeout=30) for i in range(20)))
        assert results == [True] * 20
        assert pool.stats() == {"workers": 2, "stuck": 0}
    finally:
        pool.close()


async def test_inline_isolation_evaluates_on_the_callers_thread_without_a_deadline(tmp_path: Path) -> None:
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, isolation="inline")
    try:
        assert pool.stats() == {"workers": 0, "stuck": 0}
        assert await pool.evaluate(encode_input({"n": 300}), timeout=0.000_001) is False  # ran past it: no deadline
        assert pool.evaluate_now(encode_input({"n": 5})) is True
    finally:
        pool.close()


def test_an_unknown_isolation_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EvaluatorPool(compiled(tmp_path, SLOW), isolation="fast")


def test_adaptive_isolation_in_an_old_config_runs_on_threads(tmp_path: Path) -> None:
    config_file = tmp_path / "authz.yaml"
    config_file.write_text("policy_isolation: adaptive\npolicy_threads: 3\nstrict_builtin_errors: true\n")
    config = load_config(str(config_file))
    assert (config.policy_isolation, config.policy_threads, config.strict_builtin_errors) == ("thread", 3, True)


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 2), (8, 7)])
def test_a_process_evaluates_on_its_cores_but_the_event_loops_one(cores: int, threads: int) -> None:
    assert default_pool_size(cores) == threads


def test_by_default_a_process_evaluates_on_the_cores_it_may_use_less_one() -> None:
    import os

    assert default_pool_size() == max(1, len(os.sched_getaffinity(0)) - 1)


# -- batches: several queued inputs in one engine call

BATCHED = """package envoy.authz
import rego.v1
default allow := false
allow if {
    some route in data.routes
    route.method == input.method
    glob.match(route.path, ["/"], input.path)
    input.user in route.users
}
allow := {"allowed": true, "headers": {"x-user": input.user}} if input.user == "root"
x := 1 if input.a
x := 2 if input.b
allow := x if input.conflict
"""
BATCH_DATA = {"routes": [{"method": m, "path": f"/api/{s}/*", "users": [f"u{n}" for n in range(s, s + 5)]}
                         for s in range(10) for m in ("GET", "POST")]}


def batch_inputs(count: int, seed: int) -> list[dict[str, object]]:
    import random

    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.1:
            out.append({"user": "root", "method": "GET", "path": "/x"})
        elif kind < 0.15:
            out.append({"method": 5})  # reads nothing it expects: the default
        elif kind < 0.2:
            out.append({})  # `allow` left at its default; `x` undefined
        else:
            out.append({"method": rng.choice(["GET", "POST", "PUT"]), "user": f"u{rng.randrange(16)}",
                        "path": f"/api/{rng.randrange(12)}/{rng.randrange(10**6)}"})
    return out


@pytest.fixture
def batched(tmp_path: Path) -> CompiledPolicy:
    write_policy(tmp_path, BATCHED)
    (tmp_path / "data.json").write_text(json.dumps(BATCH_DATA))
    return CompiledPolicy.compile(load_policy_set(tmp_path), QUERY)


@pytest.mark.parametrize("seed", range(5))
def test_a_batch_answers_each_input_as_it_would_alone(batched: CompiledPolicy, seed: int) -> None:
    evaluator = batched.new_evaluator()
    try:
        inputs = [encode_input(doc) for doc in batch_inputs(40, seed)]
        alone = [evaluator.evaluate(one) for one in inputs]
        for size in (2, 5, 16, 40):
            together: list[object] = []
            for start in range(0, len(inputs), size):
                values = evaluator.evaluate_many(inputs[start:start + size])
                assert values is not None
                together.extend(values)
            assert together == alone, size
        assert {"allowed": True, "headers": {"x-user": "root"}} in alone and True in alone and False in alone
    finally:
        evaluator.close()


def test_a_batch_holding_an_input_that_fails_is_refused_whole(batched: CompiledPolicy) -> None:
    evaluator = batched.new_evaluator()
    try:
        good = encode_input({"user": "root"})
        assert evaluator.evaluate_many([good, encode_input({"conflict": True, "a": True, "b": True}), good]) is None
        with pytest.raises(PolicyError):
            evaluator.evaluate(encode_input({"conflict": True, "a": True, "b": True}))
        assert evaluator.evaluate_many([good, good]) == [{"allowed": True, "headers": {"x-user": "root"}}] * 2
    finally:
        evaluator.close()


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the engine is given, in order."""
    sizes: list[int] = []
    original = engine_module.Evaluator.evaluate_many

    def counted(self: engine_module.Evaluator, inputs: list[bytes]) -> object:
        sizes.append(len(inputs))
        return original(self, inputs)

    monkeypatch.setattr(engine_module.Evaluator, "evaluate_many", counted)
    return sizes


async def test_under_load_the_pool_batches_and_each_request_gets_its_own_answer(
        batched: CompiledPolicy, batch_sizes: list[int]) -> None:
    documents = batch_inputs(200, 7)
    documents[50] = {"conflict": True, "a": True, "b": True}  # its batch is evaluated one by one
    reference = batched.new_evaluator()
    try:
        expected: list[object] = []
        for doc in documents:
            try:
                expected.append(reference.evaluate(encode_input(doc)))
            except PolicyError as exc:
                expected.append(exc.code)
    finally:
        reference.close()
    pool = EvaluatorPool(batched, size=1)
    try:
        answers = await asyncio.gather(*(pool.evaluate(encode_input(doc), timeout=60) for doc in documents),
                                       return_exceptions=True)
    finally:
        pool.close()
    assert [a.code if isinstance(a, PolicyError) else a for a in answers] == expected
    assert batch_sizes and max(batch_sizes) > 1, "200 requests at once never made a batch"


async def test_requests_batched_with_a_stuck_one_are_answered_by_another_worker(
        tmp_path: Path, batch_sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    returned: list[list[bytes]] = []  # the inputs of each batch whose engine call has come back
    counted = engine_module.Evaluator.evaluate_many

    def noted(self: engine_module.Evaluator, inputs: list[bytes]) -> object:
        try:
            return counted(self, inputs)
        finally:
            returned.append(list(inputs))

    monkeypatch.setattr(engine_module.Evaluator, "evaluate_many", noted)
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, spare=2)
    try:
        # The rest queue up while the worker wakes or works on the first: it takes them as one
        # batch, stuck behind an input that runs for many seconds (4x STUCK's work). Deadlines
        # are generous (a slow machine drops nothing unevaluated); what is held is the order.
        busy = asyncio.ensure_future(pool.evaluate(encode_input({"n": 350}), timeout=60))
        await asyncio.sleep(0)
        stuck_input = encode_input({"n": 2000})
        stuck = asyncio.ensure_future(pool.evaluate(stuck_input, timeout=3))
        fast = [asyncio.ensure_future(pool.evaluate(encode_input({"n": i}), timeout=120)) for i in range(8)]
        assert await busy is False
        with pytest.raises(PolicyError) as error:
            await stuck
        assert error.value.code == "policy_timeout"
        assert await asyncio.gather(*fast) == [True] * 8
        assert batch_sizes and batch_sizes[0] >= 9, batch_sizes  # the stuck input and its eight batchmates at least
        # Answered while the stuck batch's engine call still runs: by the replacement worker.
        assert not any(stuck_input in inputs for inputs in returned), (batch_sizes, returned)
    finally:
        pool.close()
