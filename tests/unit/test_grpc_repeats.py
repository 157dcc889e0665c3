"""The gRPC servicer's repeat path: a request that differs from an earlier one only in its
per-request values (request id, time, source port, tracing headers) gets the earlier cached
allow again, with its own decision id and its own values in what the observers (audit) see,
and only while nothing that could change the answer has changed. The HTTP front's repeats
(byte-identical requests) go through the same ``RepeatCache`` and ``Pipeline.replay``."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any, Iterator

import pytest

from authz_server.decision import Decision, DecisionSettings, Pipeline
from authz_server.envoy import CheckResponse, check_request_from_json
from authz_server.facts import Facts
from authz_server.http import HttpRequest
from authz_server.httpfront import HttpFront
from authz_server.policy.loader import PolicyRuntime
from authz_server.server import AuthorizationServicer
from tests.support.authz import write_policy

PUBLIC_ONLY = """
package envoy.authz
import rego.v1

default allow := false

allow if input.parsed_path[0] == "public"
"""
NOTHING = "package envoy.authz\nimport rego.v1\ndefault allow := false\n"
OK, PERMISSION_DENIED = 0, 7


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Server:
    """A servicer on a real pipeline and policy engine; each call as Envoy would send it."""

    def __init__(self, folder: Path) -> None:
        write_policy(folder, PUBLIC_ONLY)
        self.runtime = PolicyRuntime(str(folder), isolation="inline")
        self.runtime.load()
        self.seen: list[tuple[Decision, Facts | None]] = []
        self.pipeline = Pipeline(self.runtime, settings=DecisionSettings(cache_ttl=5.0),
                                 observers=[lambda decision, facts, now: self.seen.append((decision, facts))])
        self.clock = Clock()
        self.servicer = AuthorizationServicer(self.pipeline, clock=self.clock)
        self.calls = 0

    def check(self, path: str = "/public/a", *, raw_headers: bool = False, body: str = "",
              port: int | None = None) -> CheckResponse:
        self.calls += 1
        n = self.calls
        headers = {":path": path, "x-request-id": f"req-{n}", "traceparent": f"00-{n:032x}-{n:016x}-01",
                   "user-agent": "test"}
        http: dict[str, Any] = {"id": str(1000 + n), "method": "GET", "path": path, "host": "svc", "body": body}
        if raw_headers:
            http["headerMap"] = {"headers": [{"key": k, "rawValue": base64.b64encode(v.encode()).decode()}
                                             for k, v in headers.items()]}
        else:
            http["headers"] = headers
        request = check_request_from_json({"attributes": {
            "source": {"address": {"socketAddress": {"address": "10.0.0.7", "portValue": port or 40000 + n}}},
            "request": {"time": f"2027-01-15T08:00:{n % 60:02d}Z", "http": http}}})
        raw = asyncio.run(self.servicer.check(request.SerializeToString(), None))  # type: ignore[arg-type]
        response = CheckResponse()
        response.ParseFromString(raw)
        return response


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "policies")
    yield server
    server.runtime.close()


def decision_id(response: CheckResponse) -> str:
    return response.dynamic_metadata["decision_id"]


def test_repeats_are_replayed_with_their_own_ids_and_per_request_values(server: Server) -> None:
    answers = [server.check() for _ in range(6)]
    assert all(a.status.code == OK for a in answers)
    assert len({decision_id(a) for a in answers}) == 6
    # 1st: the policy decides; 2nd: a decision-cache hit, kept as a repeat; then replayed.
    assert server.servicer.repeats.hits == 4
    assert [d.cached for d, _ in server.seen] == [False, True, True, True, True, True]
    for n, (decision, facts) in enumerate(server.seen, start=1):
        assert facts is not None and decision.decision_id == decision_id(answers[n - 1])
        assert facts.request_id == str(1000 + n) and facts.source_port == 40000 + n
        http = facts.attributes()["request"]["http"]
        assert http["id"] == str(1000 + n)
        assert http["headers"]["x-request-id"] == f"req-{n}"  # this request's, not the first one's
        assert facts.attributes()["source"]["address"]["socketAddress"]["portValue"] == 40000 + n


def test_a_request_that_differs_in_anything_else_is_decided_on_its_own(server: Server) -> None:
    for _ in range(3):
        assert server.check("/public/a").status.code == OK
    hits = server.servicer.repeats.hits
    assert server.check("/private/a").status.code == PERMISSION_DENIED
    assert server.check("/public/b").status.code == OK
    assert server.servicer.repeats.hits == hits


def test_no_repeat_outlives_the_cached_verdict(server: Server) -> None:
    for _ in range(3):
        server.check()
    hits = server.servicer.repeats.hits
    server.clock.now += 6.0  # past cache_ttl
    assert server.check().status.code == OK
    assert server.servicer.repeats.hits == hits
    assert server.seen[-1][0].cached is False  # the policy was asked again


def test_a_policy_change_ends_every_repeat(server: Server, tmp_path: Path) -> None:
    for _ in range(3):
        assert server.check().status.code == OK
    write_policy(tmp_path / "policies", NOTHING)
    asyncio.run(server.runtime.reload())
    assert server.check().status.code == PERMISSION_DENIED


def test_raw_header_requests_are_never_replayed(server: Server) -> None:
    """Their headers keep the volatile values, so an earlier request's facts would be wrong."""
    answers = [server.check(raw_headers=True) for _ in range(4)]
    assert all(a.status.code == OK for a in answers)
    assert server.servicer.repeats.hits == 0
    assert [facts.request_id for _, facts in server.seen if facts] == ["1001", "1002", "1003", "1004"]


def test_big_requests_are_not_kept_as_repeats(server: Server) -> None:
    """A repeat keeps the first request's facts, body included: the cache's size is bounded."""
    big = "x" * (server.servicer.repeats.max_request_bytes + 1)
    assert all(server.check(body=big).status.code == OK for _ in range(4))
    assert server.servicer.repeats.hits == 0 and len(server.servicer.repeats) == 0
    assert [d.cached for d, _ in server.seen] == [False, True, True, True]  # still the decision cache


@pytest.mark.parametrize(("step", "path"), [("facts_from_check_request", "/public/new"), ("repeat_facts", "/public/a")])
def test_a_surprise_while_reading_the_request_denies_and_never_escapes(server: Server, step: str, path: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        server.check("/public/a")  # the second one is kept as a repeat

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(f"authz_server.server.{step}", broken)
    answer = server.check(path)
    assert answer.status.code != OK and answer.denied_response.status.code == 403
    assert server.seen[-1][0].code == "internal_error"


EVEN_PORTS_ONLY = """
package envoy.authz
import rego.v1

default allow := false

allow if input.attributes.source.address.socketAddress.portValue % 2 == 0
"""


def test_a_policy_that_reads_a_per_request_value_is_never_replayed(server: Server, tmp_path: Path) -> None:
    """The fingerprint leaves out the source port; a policy that reads it has its decisions
    keyed on it, so the answer for one port must never be replayed for another."""
    write_policy(tmp_path / "policies", EVEN_PORTS_ONLY)
    asyncio.run(server.runtime.reload())
    answers = [server.check(port=port).status.code for port in (40002, 40002, 40003, 40004, 40005)]
    assert answers == [OK, OK, PERMISSION_DENIED, OK, PERMISSION_DENIED]
    assert server.servicer.repeats.hits == 0


def test_the_http_front_replays_identical_requests(server: Server) -> None:
    """The HTTP front keeps a cached allow by the request's bytes (the digest the connection
    gives a request that came as one whole read) and answers the same bytes from it, each
    time with a new decision id; other bytes are decided on their own."""
    front = HttpFront(server.pipeline, clock=server.clock)

    def request(path: str) -> HttpRequest:
        return HttpRequest("GET", f"/check{path}", {"host": "svc"}, repeat_key=path.encode())

    for _ in range(2):  # the policy decides, then a decision-cache hit is kept as a repeat
        assert front.replay(b"/public/a") is None
        assert asyncio.run(front.handle(request("/public/a"))).startswith(b"HTTP/1.1 200")
    answers = [front.replay(b"/public/a") for _ in range(2)]
    assert all(a is not None and a.startswith(b"HTTP/1.1 200") for a in answers)
    assert front.exact.hits == 2 and answers[0] != answers[1]  # their decision ids differ
    assert front.replay(b"/public/b") is None
