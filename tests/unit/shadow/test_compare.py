"""How a shadow answer differs from the live one."""

from __future__ import annotations

from authz_server.policy.engine import UNDEFINED
from authz_server.shadow.compare import disagreement, from_verdict, shadow_outcome
from authz_server.response import read_result


def _outcome(result: object) -> object:
    return shadow_outcome(result, deny_status=403)


def test_kinds() -> None:
    allow, deny = _outcome(True), _outcome(False)
    assert disagreement(allow, deny) == "allow_to_deny"
    assert disagreement(deny, allow) == "deny_to_allow"
    assert disagreement(deny, _outcome({"allowed": False, "http_status": 429})) == "status_differs"
    assert disagreement(_outcome({"allowed": True, "headers": {"x-tier": "gold"}}),
                        _outcome({"allowed": True, "headers": {"x-tier": "silver"}})) == "headers_differ"
    assert disagreement(_outcome({"allowed": False, "body": "no"}), _outcome({"allowed": False, "body": "nope"})) == \
        "headers_differ"
    assert disagreement(allow, _outcome({"allowed": True})) is None
    assert disagreement(_outcome({"allowed": True, "headers": {"A": "1", "b": "2"}}),
                        _outcome({"allowed": True, "headers": {"b": "2", "a": "1"}})) is None


def test_an_unusable_shadow_answer_is_a_deny_with_its_code() -> None:
    assert _outcome(UNDEFINED).error == "policy_undefined" and not _outcome(UNDEFINED).allowed
    bad = _outcome({"allow": True})
    assert bad.error == "policy_result_invalid" and not bad.allowed
    assert from_verdict(read_result(False)).http_status == 403
