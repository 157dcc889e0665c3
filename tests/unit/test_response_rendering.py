"""What Envoy receives: the memoized rendering of a cached allow equals a fresh one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from authz_server.decision import Pipeline
from authz_server.envoy import CheckResponse, check_request_from_json, check_response, check_response_bytes, \
    facts_from_check_request
from authz_server.policy.loader import PolicyRuntime
from tests.support.authz import write_policy

POLICY = """
package envoy.authz
import rego.v1
allow := {"allowed": true, "headers": {"x-a": "1"}, "dynamic_metadata": {"team": "blue"}} if input.parsed_path[0] == "a"
"""


def test_cached_allow_renders_like_a_fresh_one(tmp_path: Path) -> None:
    write_policy(tmp_path, POLICY)
    runtime = PolicyRuntime(str(tmp_path))
    runtime.load()
    pipeline = Pipeline(runtime)

    async def decide():  # type: ignore[no-untyped-def]
        return await pipeline.decide(facts_from_check_request(check_request_from_json(
            {"attributes": {"request": {"http": {"method": "GET", "path": "/a"}}}})), now=1000.0)

    first = asyncio.run(decide())
    check_response_bytes(asyncio.run(decide()))  # rendering a cached allow fills its memo
    cached = asyncio.run(decide())
    assert cached.cached and cached.memo.get("grpc")
    fast = CheckResponse.FromString(check_response_bytes(cached))
    slow = check_response(cached)
    assert fast == slow
    assert fast.dynamic_metadata["decision_id"] == cached.decision_id  # not the placeholder
    assert fast.dynamic_metadata["team"] == "blue"
    ids = [h.header.value for h in fast.ok_response.headers if h.header.key == "x-authz-decision-id"]
    assert ids == [cached.decision_id]
    assert cached.decision_id != first.decision_id
    runtime.close()


REASON_POLICY = """
package envoy.authz
import rego.v1
allow := {"allowed": false, "http_status": 429, "reason": "rate_limited", "headers": {"retry-after": "2"}} if {
    input.parsed_path[0] == "busy"
}
allow := {"allowed": false, "reason": "Not A Code"} if input.parsed_path[0] == "bad"
"""


def test_a_policy_reason_becomes_the_decision_code(tmp_path: Path) -> None:
    write_policy(tmp_path, REASON_POLICY)
    runtime = PolicyRuntime(str(tmp_path))
    runtime.load()
    pipeline = Pipeline(runtime)

    def decide(path: str):  # type: ignore[no-untyped-def]
        return asyncio.run(pipeline.decide(facts_from_check_request(check_request_from_json(
            {"attributes": {"request": {"http": {"method": "GET", "path": path}}}})), now=1000.0))

    busy = decide("/busy")
    assert (busy.allowed, busy.code, busy.http_status) == (False, "rate_limited", 429)
    assert check_response(busy).status.message == "rate_limited"
    assert dict(busy.response_headers)["retry-after"] == "2"
    bad = decide("/bad")
    assert bad.code == "policy_result_invalid"  # not a code: the result is refused, and denies
    runtime.close()
