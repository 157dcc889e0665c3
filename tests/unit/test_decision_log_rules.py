"""Decision-log mask and drop rules as OPA applies them, and upload chunks within the size limit."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from authz_server.audit.logrules import DecisionLogRules, MaskRule, MaskRuleError, parse_mask_rules
from authz_server.audit.sinks.http import encode_chunks
from authz_server.policy.source import CacheSettings, PolicySet


def _event() -> dict[str, Any]:
    return {"decision_id": "d1", "input": {"attributes": {"request": {"http": {"headers": {"x-ssn": "123"}}}},
                                           "list": ["a", "b", "c"]},
            "result": {"allowed": True, "headers": {"x": "1"}}}


def test_mask_rules_erase_and_upsert_and_list_what_they_changed() -> None:
    event = _event()
    for rule in parse_mask_rules(["/input/attributes/request/http/headers/x-ssn", "/input/list/1",
                                  {"op": "upsert", "path": "/result/headers/x", "value": "***"},
                                  "/input/not/there"]):
        rule.apply(event)
    assert event["input"]["attributes"]["request"]["http"]["headers"] == {}
    assert event["input"]["list"] == ["a", "c"]
    assert event["result"]["headers"]["x"] == "***"
    assert event["erased"] == ["/input/attributes/request/http/headers/x-ssn", "/input/list/1"]
    assert event["masked"] == ["/result/headers/x"]


def test_a_whole_part_can_go() -> None:
    event = _event()
    MaskRule.parse("/input").apply(event)
    assert "input" not in event and event["erased"] == ["/input"]


@pytest.mark.parametrize("bad", [["input/x"], ["/labels/id"], [{"op": "replace", "path": "/input/x"}], "/input", [5]])
def test_malformed_mask_rules_are_errors(bad: Any) -> None:
    with pytest.raises(MaskRuleError):
        parse_mask_rules(bad)


def _policy(source: str) -> PolicySet:
    return PolicySet(modules={"log.rego": source}, data={}, test_cases={}, cache=CacheSettings(), version="v1")


def test_rules_in_rego_drop_and_mask() -> None:
    rules = DecisionLogRules(lambda: _policy(
        'package system.log\nimport rego.v1\n'
        'drop if input.input.attributes.request.http.headers["x-ssn"] == "000"\n'
        'mask contains "/input/attributes/request/http/headers/x-ssn"\n'
        'mask contains {"op": "upsert", "path": "/result/headers/x", "value": "masked"} if input.result.allowed\n'))
    event = _event()
    assert rules.apply(event)
    assert event["erased"] == ["/input/attributes/request/http/headers/x-ssn"]
    assert event["result"]["headers"]["x"] == "masked"
    dropped = _event()
    dropped["input"]["attributes"]["request"]["http"]["headers"]["x-ssn"] = "000"
    assert not rules.apply(dropped)
    rules.close()


def test_without_rules_in_the_policy_nothing_is_evaluated() -> None:
    rules = DecisionLogRules(lambda: _policy("package envoy.authz\nallow := true\n"))
    event = _event()
    assert rules.apply(event) and event == _event()


def test_chunks_stay_within_the_upload_limit_and_keep_order() -> None:
    events = [json.dumps({"decision_id": str(i), "input": {"path": f"/orders/{i * 7919 % 10007}"}}).encode()
              for i in range(2000)]
    chunks, too_large = encode_chunks(events, 4096)
    assert too_large == 0 and all(len(body) <= 4096 for body, _ in chunks)
    decoded = [event for body, _ in chunks for event in json.loads(gzip.decompress(body))]
    assert [e["decision_id"] for e in decoded] == [str(i) for i in range(2000)]
    assert sum(count for _, count in chunks) == 2000
    huge = json.dumps({"decision_id": "big", "input": {"blob": __import__("os").urandom(8000).hex()}}).encode()
    chunks, too_large = encode_chunks([events[0], huge, events[1]], 4096)
    assert too_large == 1 and sum(count for _, count in chunks) == 2
