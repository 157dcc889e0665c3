"""The Rego engine behind the decisions: compile errors with file:line, evaluation errors and
bad inputs translated into our errors, and the evaluator pool's deadline and isolation."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from authz_server.errors import PolicyError, RequestError
from authz_server.policy.engine import UNDEFINED, CompiledPolicy, EvaluatorPool, validate_query
from authz_server.policy.source import load_policy_set
from tests.support.authz import write_policy

QUERY = "data.envoy.authz.allow"

# Slow on purpose: about 0.16 s of engine time for n=100000 on the CI machine; fast for small n.
SLOW = """package envoy.authz
import rego.v1
default allow := false
allow if count([x | some x in numbers.range(1, input.n)]) > 0
"""


def compiled(tmp_path: Path, source: str, query: str = QUERY) -> CompiledPolicy:
    write_policy(tmp_path, source)
    return CompiledPolicy.compile(load_policy_set(tmp_path), query)


def test_a_compile_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    write_policy(tmp_path, "package envoy.authz\nimport rego.v1\n\nallow if {\n    input.x ==\n}\n", "authz.rego")
    write_policy(tmp_path, "package lib\n", "lib.rego")
    with pytest.raises(PolicyError) as error:
        CompiledPolicy.compile(load_policy_set(tmp_path), QUERY)
    assert error.value.code == "policy_compile_error"
    assert error.value.message == "authz.rego:5:13: Invalid boolean operator"


def test_every_syntax_error_is_located(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as error:
        compiled(tmp_path, "package envoy.authz\nallow if {\n")
    assert error.value.message == "policy.rego:2:10: this is unclosed; policy.rego:1:1: this is unclosed"


@pytest.mark.parametrize("query", ["allow", "data.", "data.envoy.authz.allow; true", "data.x with input as 1",
                                   "input.x", "data.envoy[authz]"])
def test_only_data_references_are_queries(query: str) -> None:
    with pytest.raises(PolicyError) as error:
        validate_query(query)
    assert error.value.code == "policy_query_invalid"


def test_data_references_are_queries() -> None:
    for query in (QUERY, 'data["envoy"].authz.allow', "data.x_1.y"):
        assert validate_query(query) == query


def test_values_and_undefined(tmp_path: Path) -> None:
    evaluator = compiled(tmp_path, 'package envoy.authz\nimport rego.v1\nallow := {"allowed": true, "n": input.n} '
                                   "if input.n > 1\nallow := false if input.n == 1\n").new_evaluator()
    assert evaluator.evaluate({"n": 2}) == {"allowed": True, "n": 2}
    assert evaluator.evaluate({"n": 1}) is False  # a bound query: false is a value, not undefined
    assert evaluator.evaluate({"n": 0}) is UNDEFINED
    assert evaluator.evaluate({}) is UNDEFINED


# Characters JSON escapes: the policy must see (and hand back) exactly the string that was sent.
AWKWARD_STRINGS = ['say "hi"', "back\\slash", "a\\nb", "x\\My", "line\nbreak", "tab\there", "ctl\x01",
                   "é✓ 日本", '\\"', "\\"]


@pytest.mark.parametrize("text", AWKWARD_STRINGS)
def test_strings_reach_the_policy_unchanged(tmp_path: Path, text: str) -> None:
    expected = json.dumps(text, ensure_ascii=False)  # as a Rego literal: the same escapes as JSON
    evaluator = compiled(tmp_path, "package envoy.authz\nimport rego.v1\n"
                                   f"allow := {{\"same\": input.s == {expected}, \"back\": input.s, "
                                   f"\"key\": object.keys(input.o)}}\n").new_evaluator()
    assert evaluator.evaluate({"s": text, "o": {text: 1}}) == {"same": True, "back": text, "key": [text]}


def test_a_conflict_at_evaluation_is_a_policy_error(tmp_path: Path) -> None:
    evaluator = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow := true if input.a\n"
                                   "allow := false if input.b\n").new_evaluator()
    assert evaluator.evaluate({"a": True}) is True
    with pytest.raises(PolicyError) as error:
        evaluator.evaluate({"a": True, "b": True})
    assert error.value.code == "policy_eval_error"
    assert error.value.message == "complete rules must not produce multiple outputs"
    assert evaluator.evaluate({"b": True}) is False  # the evaluator is still good


def test_a_builtin_error_is_a_policy_error(tmp_path: Path) -> None:
    evaluator = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow if to_number(input.s) > 1\n",
                         ).new_evaluator()
    assert evaluator.evaluate({"s": "2"}) is True
    try:
        value = evaluator.evaluate({"s": "two"})
    except PolicyError as error:
        assert error.code == "policy_eval_error"
    else:
        assert value is UNDEFINED  # non-strict builtin errors leave the rule undefined, as in OPA


@pytest.mark.parametrize("document", [
    {"a": "x\x00y"}, {"a\x00": 1}, {"a": ["ok", "nul\x00"]},
    {"a": 2**63}, {"a": -(2**63) - 1}, {"a": b"bytes"}, {"a": {1, 2}}, {1: "key not a string"},
    {"a": "\udcff"},  # a lone surrogate (what surrogateescape leaves behind) is not UTF-8
], ids=["nul-value", "nul-key", "nul-in-list", "int-too-big", "int-too-small", "bytes", "set", "int-key",
        "surrogate"])
def test_input_the_engine_cannot_take_is_a_request_error(tmp_path: Path, document: dict) -> None:  # type: ignore[type-arg]
    evaluator = compiled(tmp_path, "package envoy.authz\nimport rego.v1\nallow := true\n").new_evaluator()
    with pytest.raises(RequestError) as error:
        evaluator.evaluate(document)
    assert error.value.code == "bad_request"
    assert evaluator.evaluate({"a": "fine", "n": 2**63 - 1, "f": 1.5, "t": (1, 2), "z": None}) is True


async def test_a_slow_policy_times_out_on_threads_and_the_pool_keeps_serving(tmp_path: Path) -> None:
    timeouts: list[int] = []
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, spare=1, isolation="thread",
                         on_timeout=lambda: timeouts.append(1))
    try:
        assert await pool.evaluate({"n": 10}, timeout=1.0) is True
        started = time.perf_counter()
        with pytest.raises(PolicyError) as error:
            await pool.evaluate({"n": 100_000}, timeout=0.02)
        assert error.value.code == "policy_timeout"
        assert time.perf_counter() - started < 0.1  # answered at the deadline, not when the engine finished
        assert timeouts == [1]
        # The stuck evaluator was replaced: the only slot serves at once, while it still runs.
        assert await pool.evaluate({"n": 10}, timeout=1.0) is True
        # With no spare left, a second stuck one holds the slot until it returns; then it serves again.
        with pytest.raises(PolicyError):
            await pool.evaluate({"n": 100_000}, timeout=0.02)
        with pytest.raises(PolicyError) as busy:
            await pool.evaluate({"n": 10}, timeout=0.01)
        assert busy.value.code == "policy_timeout"
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await pool.evaluate({"n": 10}, timeout=0.5) is True
                break
            except PolicyError:
                assert time.monotonic() < deadline, "the pool never recovered its slot"
        assert pool.isolation == "thread" and not pool.inline
    finally:
        pool.close()


async def test_adaptive_isolation_graduates_to_inline_and_an_overrun_sends_it_back(tmp_path: Path) -> None:
    timeouts: list[int] = []
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, isolation="adaptive", probation=5,
                         on_timeout=lambda: timeouts.append(1))
    try:
        for _ in range(5):
            assert not pool.inline
            assert await pool.evaluate({"n": 10}, timeout=1.0) is True
        assert pool.inline and pool.isolation == "adaptive"
        assert await pool.evaluate({"n": 10}, timeout=1.0) is True
        # Inline there is no preemption: the overrun is noticed when it ends, denied, and the
        # version goes back to worker threads for good.
        with pytest.raises(PolicyError) as error:
            await pool.evaluate({"n": 30_000}, timeout=0.005)
        assert error.value.code == "policy_timeout"
        assert (pool.inline, pool.isolation, timeouts) == (False, "thread", [1])
        started = time.perf_counter()
        with pytest.raises(PolicyError):
            await pool.evaluate({"n": 100_000}, timeout=0.02)
        assert time.perf_counter() - started < 0.1  # on a thread again: the deadline holds
        assert await pool.evaluate({"n": 10}, timeout=1.0) is True
    finally:
        pool.close()


async def test_a_slow_start_keeps_adaptive_on_threads(tmp_path: Path) -> None:
    pool = EvaluatorPool(compiled(tmp_path, SLOW), size=1, isolation="adaptive", probation=3)
    try:
        assert await pool.evaluate({"n": 30_000}, timeout=0.25) is True  # over a tenth of the deadline
        for _ in range(5):
            assert await pool.evaluate({"n": 10}, timeout=0.25) is True
        assert (pool.inline, pool.isolation) == (False, "thread")
    finally:
        pool.close()


async def test_inline_isolation_never_uses_threads_and_many_callers_share_the_pool(tmp_path: Path) -> None:
    inline = EvaluatorPool(compiled(tmp_path, SLOW), size=1, isolation="inline")
    threaded = EvaluatorPool(compiled(tmp_path, SLOW), size=2, isolation="thread")
    try:
        assert inline.inline
        assert await inline.evaluate({"n": 30_000}, timeout=0.001) is True  # no deadline inline-only
        results = await asyncio.gather(*(threaded.evaluate({"n": 10 + i}, timeout=2.0) for i in range(20)))
        assert results == [True] * 20
        assert threaded.evaluate_now({"n": 5}) is True
    finally:
        inline.close()
        threaded.close()


def test_an_unknown_isolation_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EvaluatorPool(compiled(tmp_path, SLOW), isolation="fast")


def test_data_strings_match_input_strings(tmp_path: Path) -> None:
    write_policy(tmp_path, "package envoy.authz\nimport rego.v1\nallow if input.name in data.names\n")
    (tmp_path / "data.json").write_text(json.dumps({"names": ["José", 'say "hi"']}), encoding="utf-8")
    evaluator = CompiledPolicy.compile(load_policy_set(tmp_path), QUERY).new_evaluator()
    assert evaluator.evaluate({"name": "José"}) is True
    assert evaluator.evaluate({"name": 'say "hi"'}) is True
    assert evaluator.evaluate({"name": "Jose"}) is UNDEFINED
