"""Hostile and broken CheckRequests through a real grpc.aio server with the shipped policies.

Generated requests (random headers — odd names, huge values, case-duplicates, raw
non-UTF-8 header values —, odd paths, bodies of every kind under the wrong content type,
``body`` and ``raw_body``, missing attributes, random ``context_extensions`` and metadata),
random bytes, and byte-level mutations of a real request go to ``Check`` over loopback.
Whatever arrives:

* the answer is a CheckResponse Envoy accepts: OK with an ``ok_response``, or a deny with a
  ``denied_response`` carrying an HTTP status, and always exactly one decision id;
* no request makes the server fail inside (``internal_error``) or log an error;
* what cannot be read (bytes that are not a CheckRequest, a bad URL escape, a body that is
  not what its content type says) is denied with 400 / INVALID_ARGUMENT, never allowed;
* afterwards the server still allows what the policy allows and denies what it denies.
"""

from __future__ import annotations

import json
import logging
import string
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
import jwt
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from authz_server.config import Config
from authz_server.limits import Limits
from authz_server.server import build_app
from tests.support.authz import REPO, ServerThread, copy_policies

CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse
OK, INVALID_ARGUMENT = 0, 3
DENY_CODES = {3, 7, 14, 16}  # INVALID_ARGUMENT, PERMISSION_DENIED, UNAVAILABLE, UNAUTHENTICATED
CHECK = "/envoy.service.auth.v3.Authorization/Check"
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])

FRONTEND = "spiffe://example.org/frontend"


# -- servers: each shipped policy behind its own real server, on a loop in its own thread

@dataclass
class Server:
    name: str
    address: str
    check: Callable[..., bytes]
    channel: grpc.Channel
    normal: Callable[[], None]  # asserts the server still decides ordinary requests correctly


def _tutorial_token(role: str) -> str:
    return jwt.encode({"role": role, "sub": "YWxpY2U", "nbf": 1514851139, "exp": 4_000_000_000}, "secret",
                      algorithm="HS256")


def orders_request(**http_changes: Any) -> CheckRequest:
    """What the frontend's sidecar sends when it calls GET /orders on the orders service:
    allowed by the shipped default policy."""
    request = CheckRequest()
    source = request.attributes.source
    source.principal = FRONTEND
    source.address.socket_address.address = "10.0.0.5"
    source.address.socket_address.port_value = 41000
    request.attributes.context_extensions.update({"service": "orders", "sensitivity": "medium"})
    http = request.attributes.request.http
    http.method, http.path, http.host, http.protocol = "GET", "/orders", "orders.example", "HTTP/1.1"
    http.headers.update({"x-request-id": "abc", "user-agent": "fuzz"})
    for key, value in http_changes.items():
        setattr(http, key, value)
    return request


def people_request(token: str | None) -> CheckRequest:
    request = CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/people/bob"
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    return request


def decision_of(raw: bytes) -> CheckResponse:
    """Parse and check an answer as Envoy would take it; returns it."""
    response = CheckResponse.FromString(raw)
    assert response.status.code == OK or response.status.code in DENY_CODES, response
    part = response.ok_response if response.status.code == OK else response.denied_response
    if response.status.code == OK:
        assert response.HasField("ok_response") and not response.HasField("denied_response")
    else:
        assert response.HasField("denied_response") and not response.HasField("ok_response")
        assert 400 <= response.denied_response.status.code <= 599
        assert response.status.message, "a deny names its reason"
        assert response.status.message != "internal_error", response.status.message
    ids = [h.header.value for h in part.headers if h.header.key == "x-authz-decision-id"]
    assert len(ids) == 1 and uuid.UUID(ids[0]).version == 4, ids
    assert response.dynamic_metadata["decision_id"] == ids[0]
    for option in [*part.headers, *getattr(part, "response_headers_to_add", [])]:
        for text in (option.header.key, option.header.value):
            assert not any(c in text for c in "\r\n\x00"), f"header {option.header.key!r} could split a response"
    return response


def allowed(response: CheckResponse) -> bool:
    return response.status.code == OK


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    runner = ServerThread()
    apps, out = [], {}
    try:
        for name, folder in (("default", REPO / "policies"),
                             ("quickstart", REPO / "authz_server" / "mesh" / "policies" / "quickstart")):
            policies = copy_policies(folder, tmp_path_factory.mktemp(name))
            # Limits wide enough for the huge header values generated here: what is fuzzed is how
            # any request decodes; the limits have tests of their own (test_request_limits.py).
            app = build_app(Config(policies=str(policies), addr="127.0.0.1:0", metrics_addr="",
                                   trust_domains=("example.org",), limits=Limits(max_header_bytes=1024 * 1024)))
            bound = runner.run(app.start())
            apps.append(app)
            channel = grpc.insecure_channel(bound["addr"])
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
                                  timeout=10, wait_for_ready=True)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING  # policies loaded: ready
            check = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
            out[name] = Server(name, bound["addr"], check, channel, _normal_requests(name, check))
        yield out
    finally:
        for server in out.values():
            server.channel.close()
        for app in apps:
            runner.run(app.stop(0))
        runner.close()


def _normal_requests(name: str, check: Callable[..., bytes]) -> Callable[[], None]:
    def ask(request: CheckRequest) -> CheckResponse:
        return decision_of(check(request.SerializeToString(), timeout=10))

    def default() -> None:
        ok = ask(orders_request())
        assert allowed(ok)
        assert (base_pb2.HeaderValue(key="x-authz-spiffe-id", value=FRONTEND)
                in [h.header for h in ok.ok_response.headers])
        other = orders_request()
        other.attributes.context_extensions["service"] = "payments"
        other.attributes.request.http.path = "/payments"
        denied = ask(other)
        assert (denied.status.code, denied.denied_response.status.code) == (7, 403)

    def quickstart() -> None:
        assert allowed(ask(people_request(_tutorial_token("guest"))))
        denied = ask(people_request(None))
        assert (denied.status.code, denied.denied_response.status.code) == (7, 403)

    return default if name == "default" else quickstart


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, logger="authz_server")
    yield caplog


def assert_nothing_failed_inside(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    assert not errors, [r.getMessage() for r in errors]


# -- strategies

COMMON_HEADERS = ["content-type", "content-length", "authorization", "cookie", "x-session-id", "x-request-id",
                  "x-forwarded-client-cert", "x-authz-subject", "x-authz-spiffe-id", "host", "user-agent",
                  "x-envoy-auth-partial-body", "traceparent", "Content-Type", "AUTHORIZATION", ""]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=xyz", "multipart/form-data", "text/plain", "application/octet-stream",
                 "", "application/json, application/x-www-form-urlencoded"]

short_text = st.text(max_size=24)
huge_text = st.tuples(st.text(min_size=1, max_size=4), st.integers(1_000, 60_000)).map(lambda t: t[0] * t[1])
header_names = st.one_of(st.sampled_from(COMMON_HEADERS), short_text,
                         st.text(alphabet=string.ascii_letters + string.digits + "-_:.", min_size=1, max_size=40))
header_values = st.one_of(short_text, huge_text, st.sampled_from(CONTENT_TYPES),
                          st.sampled_from(["Bearer " + _tutorial_token("guest"), "Bearer a.b.c", "Bearer ",
                                           "Basic Zm9v", "-1", "99999999999999999999999", "10", "true",
                                           "__Host-authz-session=x"]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
bodies = st.one_of(
    json_values.map(json.dumps),  # json.dumps writes NaN and Infinity: not JSON
    st.dictionaries(short_text, short_text, max_size=4).map(urllib.parse.urlencode),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.text(max_size=300),
    st.just("--xyz\r\ncontent-disposition: form-data; name=\"a\"\r\ncontent-type: application/json\r\n\r\n"
            "{\r\n--xyz--"),
)
paths = st.one_of(
    st.sampled_from(["/orders", "/people/bob", "/people", "/", "", "//orders//x", "/orders/../payments",
                     "/orders?x=1&x=2", "/orders?a;b", "/%zz", "/orders%2Fx", "/people/%ff", "/orders#frag",
                     "*", "/orders?%", "/a?b=%G1", "/a+b?c+d=e+f"]),
    st.text(max_size=60).map(lambda s: "/" + s),
    st.text(alphabet="/%?&=;#+.abc019FfZz", max_size=40),
    huge_text.map(lambda s: "/" + s),
)
principals = st.one_of(st.sampled_from([FRONTEND, "spiffe://example.org/orders", "spiffe://evil.org/frontend",
                                        "spiffe://example.org/", "spiffe://EXAMPLE.org/frontend", "", "frontend"]),
                       st.text(max_size=40), short_text.map(lambda s: "spiffe://example.org/" + s))
context = st.dictionaries(
    st.one_of(st.sampled_from(["service", "sensitivity", "browser"]), short_text),
    st.one_of(st.sampled_from(["orders", "payments", "frontend", "low", "medium", "high", "true", ""]), short_text),
    max_size=4)


@st.composite
def check_requests(draw: st.DrawFn, likely: str = "orders") -> CheckRequest:
    """From nothing, or from a request a shipped policy allows (most often ``likely``), with
    any of its parts replaced, added to or left out."""
    start = draw(st.sampled_from([likely, likely, "empty", "orders", "people"]))
    request = {"empty": CheckRequest, "orders": orders_request,
               "people": lambda: people_request(_tutorial_token("guest"))}[start]()
    attributes = request.attributes

    def now_and_then() -> bool:
        return draw(st.integers(0, 3)) == 0

    if now_and_then():
        attributes.source.principal = draw(principals)
    if now_and_then():
        attributes.source.address.socket_address.address = draw(short_text)
        attributes.source.address.socket_address.port_value = draw(st.integers(0, 2**32 - 1))
    if now_and_then():
        attributes.source.certificate = draw(st.one_of(short_text, st.just("-----BEGIN%20CERTIFICATE-----")))
    if now_and_then():
        attributes.context_extensions.update(draw(context))
    if now_and_then():
        attributes.metadata_context.filter_metadata["envoy.filters.http.fuzz"].update(
            draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    if draw(st.integers(0, 9)) == 0:
        attributes.ClearField("request")  # no request attributes at all
        return request
    req = attributes.request
    if now_and_then():
        req.time.seconds = draw(st.integers(-2**63, 2**63 - 1))
        req.time.nanos = draw(st.integers(-2**31, 2**31 - 1))
    http = req.http
    if now_and_then():
        http.method = draw(st.one_of(st.sampled_from(["GET", "POST", "DELETE", "", "get", "CONNECT"]), short_text))
    if now_and_then():
        http.path = draw(paths)
    if now_and_then():
        http.host, http.id = draw(short_text), draw(short_text)
    if now_and_then():
        http.headers.update(draw(st.dictionaries(header_names, header_values, max_size=8)))
    if now_and_then():  # Envoy's raw form: duplicates, and bytes that are not UTF-8
        for _ in range(draw(st.integers(0, 6))):
            entry = http.header_map.headers.add()
            entry.key = draw(header_names)
            if draw(st.booleans()):
                entry.raw_value = draw(st.binary(max_size=40))
            else:
                entry.value = draw(header_values)
    kind = draw(st.sampled_from(["none", "body", "raw_body", "both"]))
    if kind in ("body", "both"):
        http.body = draw(bodies)
    if kind in ("raw_body", "both"):
        http.raw_body = draw(st.one_of(bodies.map(lambda b: b.encode("utf-8", "surrogatepass")),
                                       st.binary(max_size=300)))
    if now_and_then():
        http.headers["content-type"] = draw(st.sampled_from(CONTENT_TYPES))
    if now_and_then():
        http.size = draw(st.integers(-2**63, 2**63 - 1))
    return request


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """A real request's bytes with a few flipped, inserted, deleted, or the tail cut off."""
    base = draw(st.sampled_from([orders_request(), people_request(_tutorial_token("admin"))])).SerializeToString()
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at:at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def readable(data: bytes) -> bool:
    try:
        CheckRequest.FromString(data)
    except Exception:
        return False
    return True


def assert_refused_as_unreadable(response: CheckResponse) -> None:
    assert (response.status.code, response.denied_response.status.code) == (INVALID_ARGUMENT, 400), response.status


# -- the properties

@settings(FUZZ, max_examples=250)
@given(policy_and_request=st.sampled_from(["default", "quickstart"]).flatmap(
    lambda policy: st.tuples(st.just(policy), check_requests(likely="orders" if policy == "default" else "people"))))
def test_any_generated_request_gets_a_valid_answer(servers: dict[str, Server], no_errors_logged: Any,
                                                  policy_and_request: tuple[str, CheckRequest]) -> None:
    policy, request = policy_and_request
    server = servers[policy]
    response = decision_of(server.check(request.SerializeToString(), timeout=10))
    event(f"{policy}: {response.status.message or 'allowed'}")
    if allowed(response):  # only what the policy allows: a verified caller, or the tutorial's token
        http = request.attributes.request.http
        if policy == "default":
            assert request.attributes.source.principal.startswith("spiffe://example.org/")
        else:
            assert http.headers.get("authorization", "").startswith("Bearer ")
    assert_nothing_failed_inside(no_errors_logged)
    server.normal()


@settings(FUZZ, max_examples=300)
@given(data=st.one_of(st.binary(max_size=400), mutated_bytes()), policy=st.sampled_from(["default", "quickstart"]))
def test_random_and_mutated_bytes_are_refused_or_decided(servers: dict[str, Server], no_errors_logged: Any,
                                                         data: bytes, policy: str) -> None:
    response = decision_of(servers[policy].check(data, timeout=10))
    event(f"{'readable' if readable(data) else 'unreadable'}: {response.status.message or 'allowed'}")
    if not readable(data):
        assert_refused_as_unreadable(response)
        assert response.status.message == "malformed_request"
    assert_nothing_failed_inside(no_errors_logged)
    servers[policy].normal()


MALFORMED: dict[str, dict[str, Any]] = {
    "bad escape in path": {"path": "/orders/%zz"},
    "bad escape in query": {"path": "/orders?x=%G0"},
    "path not UTF-8 once unescaped": {"path": "/orders/%ff%fe"},
    "semicolon in query": {"path": "/orders?a=1;b=2"},
    "JSON body that is not JSON": {"body": "{\"a\": ", "content-type": "application/json"},
    "JSON body with NaN": {"body": "{\"a\": NaN}", "content-type": "application/json"},
    "raw JSON body that is not UTF-8": {"raw_body": b"{\"a\": \"\xff\"}", "content-type": "application/json"},
    "content-length that is not a number": {"body": "{}", "content-type": "application/json",
                                            "content-length": "12abc"},
    "multipart part that is not its JSON": {
        "body": "--xyz\r\ncontent-disposition: form-data; name=\"a\"\r\ncontent-type: application/json\r\n\r\n{\r\n"
                "--xyz--\r\n", "content-type": "multipart/form-data; boundary=xyz"},
}


@settings(FUZZ, max_examples=60)
@given(flaw=st.sampled_from(sorted(MALFORMED)),
       noise=st.dictionaries(st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8).map("x-fuzz-".__add__),
                             header_values, max_size=4))
def test_a_malformed_request_is_denied_even_when_the_policy_would_allow_it(
        servers: dict[str, Server], no_errors_logged: Any, flaw: str, noise: dict[str, str]) -> None:
    server = servers["default"]
    base = orders_request()
    base.attributes.request.http.headers.update(noise)
    assert allowed(decision_of(server.check(base.SerializeToString(), timeout=10)))
    broken = CheckRequest()
    broken.CopyFrom(base)
    http = broken.attributes.request.http
    for key, value in MALFORMED[flaw].items():
        if key in ("content-type", "content-length"):
            http.headers[key] = value
        else:
            setattr(http, key, value)
    response = decision_of(server.check(broken.SerializeToString(), timeout=10))
    assert_refused_as_unreadable(response)
    assert_nothing_failed_inside(no_errors_logged)


# -- sizes and load

def test_huge_and_many_headers_and_deep_bodies(servers: dict[str, Server], no_errors_logged: Any) -> None:
    server = servers["default"]
    huge = orders_request()
    huge.attributes.request.http.headers["x-huge"] = "a" * (3 * 1024 * 1024)
    refused = decision_of(server.check(huge.SerializeToString(), timeout=30))  # over the limits: not even read
    assert_refused_as_unreadable(refused)
    assert refused.status.message == "request_too_large"
    many = orders_request()
    many.attributes.request.http.headers.update({f"x-h-{i}": str(i) for i in range(20_000)})
    refused = decision_of(server.check(many.SerializeToString(), timeout=30))
    assert_refused_as_unreadable(refused)
    assert refused.status.message == "request_too_large"
    large = orders_request()
    large.attributes.request.http.headers["x-large"] = "a" * (512 * 1024)  # within these servers' limits
    assert allowed(decision_of(server.check(large.SerializeToString(), timeout=30)))  # the policy does not read it
    for depth in (500, 5_000, 100_000):
        deep = orders_request(body="[" * depth + "]" * depth)
        deep.attributes.request.http.headers["content-type"] = "application/json"
        decision_of(server.check(deep.SerializeToString(), timeout=30))  # decided or refused, never a failure
    body_policy = servers["quickstart"]
    for depth in (500, 5_000):
        post = people_request(_tutorial_token("admin"))
        post.attributes.request.http.method, post.attributes.request.http.path = "POST", "/people"
        post.attributes.request.http.headers["content-type"] = "application/json"
        post.attributes.request.http.body = '{"firstname": ' + "[" * depth + "]" * depth + "}"
        assert not allowed(decision_of(body_policy.check(post.SerializeToString(), timeout=30)))
    assert_nothing_failed_inside(no_errors_logged)
    server.normal()


def test_over_the_size_limit_is_refused_not_crashed(servers: dict[str, Server]) -> None:
    server = servers["default"]
    over = orders_request()
    over.attributes.request.http.headers["x-big"] = "a" * (4 * 1024 * 1024 + 16)
    data = over.SerializeToString()
    assert 4 * 1024 * 1024 < len(data) <= 4 * 1024 * 1024 + 1024  # gRPC takes it in: our own limit answers
    refused_by_us = decision_of(server.check(data, timeout=30))
    assert_refused_as_unreadable(refused_by_us)
    assert refused_by_us.status.message == "request_too_large"
    beyond = orders_request()
    beyond.attributes.request.http.headers["x-big"] = "a" * (5 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as refused:  # gRPC's own message limit, before the servicer
        server.check(beyond.SerializeToString(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    server.normal()


@settings(FUZZ, max_examples=5)
@given(crowd=st.lists(st.one_of(check_requests().map(CheckRequest.SerializeToString), st.binary(max_size=64)),
                      min_size=20, max_size=40))
def test_a_burst_of_hostile_requests_in_parallel(servers: dict[str, Server], no_errors_logged: Any,
                                                 crowd: list[bytes]) -> None:
    server = servers["default"]
    ordinary = orders_request().SerializeToString()
    payloads = [data for pair in zip(crowd, [ordinary] * len(crowd)) for data in pair]
    futures = [server.check.future(data, timeout=30) for data in payloads]
    answers = [decision_of(future.result()) for future in futures]
    assert all(allowed(answer) for answer in answers[1::2])  # the ordinary ones in the crowd: decided as usual
    assert_nothing_failed_inside(no_errors_logged)


def test_the_servers_still_decide_correctly_and_report_serving(servers: dict[str, Server]) -> None:
    """Runs last in this file: after everything above, both servers are up and right."""
    for server in servers.values():
        server.normal()
        health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
