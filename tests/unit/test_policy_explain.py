"""Explanations: the engine records OPA's trace when asked, ``policy.explain`` filters it as
``opa eval --explain`` does and says which rules were evaluated and why the result came out,
and ``authz-server policy eval --explain`` prints both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authz_server.cli import main
from authz_server.policy.engine import UNDEFINED, CompiledPolicy, encode_input
from authz_server.policy.explain import explain, lineage, pretty, summarize
from authz_server.policy.source import load_policy_set
from tests.support.authz import write_policy

QUERY = "data.envoy.authz.allow"
POLICY = """package envoy.authz
import rego.v1

default allow := false

allow if input.parsed_path[0] == "public"

allow if {
    input.parsed_path[0] == "orders"
    trace("orders need an admin")
    is_admin
}

is_admin if "admin" in data.roles[input.identity.user.sub]
"""
DATA = {"roles": {"alice": ["admin"]}}


def orders(sub: str) -> dict[str, object]:
    return {"parsed_path": ["orders", "1"], "identity": {"user": {"sub": sub}}}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_policy(tmp_path, POLICY, "authz.rego")
    (tmp_path / "data.json").write_text(json.dumps(DATA))
    return tmp_path


@pytest.fixture
def evaluator(folder: Path):  # type: ignore[no-untyped-def]
    evaluator = CompiledPolicy.compile(load_policy_set(folder), QUERY).new_evaluator()
    yield evaluator
    evaluator.close()


def test_a_traced_evaluation_gives_the_same_value_and_the_engines_events(evaluator) -> None:  # type: ignore[no-untyped-def]
    for sub, allowed in (("bob", False), ("alice", True)):
        document = encode_input(orders(sub))
        traced = evaluator.evaluate_traced(document)
        assert traced.value is allowed is evaluator.evaluate(document)
        ops = {event["op"] for event in traced.events}
        assert {"Enter", "Eval", "Exit", "Note"} <= ops
        assert all({"op", "query_id", "parent_id", "location"} <= event.keys() for event in traced.events)
    assert evaluator.query_traced("data.envoy.authz.nothing", None).value is UNDEFINED


def test_fails_keeps_each_failure_with_the_rules_that_led_to_it(evaluator) -> None:  # type: ignore[no-untyped-def]
    events = evaluator.evaluate_traced(encode_input(orders("bob"))).events
    fails = lineage(events, "fails")
    assert [e["op"] for e in fails] == ["Enter", "Enter", "Enter", "Fail", "Fail"]
    assert [e["location"] for e in fails if e["op"] == "Fail"] == ["authz.rego:14", "authz.rego:11"]
    notes = lineage(events, "notes")
    assert notes[-1] == {**notes[-1], "op": "Note", "message": "orders need an admin"}
    assert notes[-2]["op"] == "Enter" and notes[-2]["location"] == "authz.rego:8"
    assert "Unify" in {e["op"] for e in events} and "Unify" not in {e["op"] for e in lineage(events, "full")}
    assert lineage(events, "debug") == events
    with pytest.raises(ValueError):
        lineage(events, "everything")


def test_pretty_lines_read_as_opa_eval_explain(evaluator) -> None:  # type: ignore[no-untyped-def]
    events = evaluator.evaluate_traced(encode_input(orders("bob"))).events
    lines = pretty(lineage(events, "fails"), {"authz.rego": "envoy.authz"})
    assert [line.split(None, 1)[1] for line in lines] == [
        "Enter data.envoy.authz.allow = _",
        "| Enter data.envoy.authz.allow",
        "| | Enter data.envoy.authz.is_admin",
        "| | | Fail __local1__ = data.roles[__local0__]",
        "| | Fail data.envoy.authz.is_admin",
    ]
    assert lines[0].startswith("query:1 ") and lines[1].startswith("authz.rego:8 ")


def test_the_summary_names_the_rule_that_decided_and_where_the_others_stopped(evaluator) -> None:  # type: ignore[no-untyped-def]
    modules = evaluator.compiled.modules
    denied = evaluator.evaluate_traced(encode_input(orders("bob")))
    summary = summarize(denied.events, defined=True, modules=modules)
    assert summary["decided_by"] == [{"rule": QUERY, "location": "authz.rego:4", "default": True}]
    assert summary["because"].startswith("the default applied: data.envoy.authz.allow (authz.rego:4)")
    is_admin = next(rule for rule in summary["rules"] if rule["rule"] == "data.envoy.authz.is_admin")
    assert is_admin["succeeded"] == 0
    assert is_admin["failed_at"] == [{"expression": "__local1__ = data.roles[__local0__]", "location": "authz.rego:14",
                                      "source": 'is_admin if "admin" in data.roles[input.identity.user.sub]'}]
    allowed = evaluator.evaluate_traced(encode_input(orders("alice")))
    summary = summarize(allowed.events, defined=True, modules=modules)
    assert summary["because"] == "decided by data.envoy.authz.allow (authz.rego:8)"
    assert all("failed_at" not in rule for rule in summary["rules"])
    undefined = evaluator.query_traced("data.envoy.authz.is_admin", encode_input(orders("bob")))
    assert undefined.result == []
    assert summarize(undefined.events, defined=False, modules=modules)["because"].startswith(
        "undefined: no rule succeeded (data.envoy.authz.is_admin (authz.rego:14) stopped at authz.rego:14")


def test_explanations_never_copy_bound_values(evaluator) -> None:  # type: ignore[no-untyped-def]
    traced = evaluator.evaluate_traced(encode_input(orders("secret-subject-4711")))
    assert "secret-subject-4711" in json.dumps(traced.events)  # the engine's own trace holds it (Unify, locals)
    for mode in ("notes", "fails", "full"):
        explanation = explain(traced.events, mode, defined=True, modules=evaluator.compiled.modules)
        assert "secret-subject-4711" not in json.dumps(explanation.to_json())
        assert all("locals" not in event for event in explanation.events)


def test_a_long_trace_is_cut_and_says_how_much(evaluator) -> None:  # type: ignore[no-untyped-def]
    traced = evaluator.evaluate_traced(encode_input(orders("bob")))
    explanation = explain(traced.events, "full", defined=True, max_events=3)
    assert len(explanation.lines) == 3 and explanation.to_json()["trace_omitted"] == len(lineage(traced.events,
                                                                                                  "full")) - 3


def test_policy_eval_explain_prints_the_trace_then_why_then_the_result(folder: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "input.json"
    source.write_text(json.dumps(orders("bob")))
    assert main(["policy", "eval", "--explain", "fails", "--format", "pretty", "-d", str(folder), "-i", str(source),
                 QUERY]) == 0
    out = capsys.readouterr().out
    assert "| | | Fail __local1__ = data.roles[__local0__]" in out
    assert "Why: the default applied: data.envoy.authz.allow" in out
    assert 'stopped at ' in out and 'is_admin if "admin" in data.roles[input.identity.user.sub]' in out
    assert out.rstrip().endswith("false")

    assert main(["policy", "eval", "--explain", "notes", "-d", str(folder), "-i", str(source), QUERY]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["result"][0]["expressions"][0]["value"] is False
    assert printed["explanation"][-1]["op"] == "Note"
    assert printed["summary"]["decided_by"][0]["default"] is True

    # other formats keep stdout for the values: the explanation goes to stderr
    assert main(["policy", "eval", "--explain", "full", "--format", "values", "-d", str(folder), "-i", str(source),
                 QUERY]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [False]
    assert "Why:" in captured.err


def test_policy_eval_without_explain_prints_no_explanation(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "eval", "-d", str(folder), QUERY]) == 0
    assert "explanation" not in capsys.readouterr().out
