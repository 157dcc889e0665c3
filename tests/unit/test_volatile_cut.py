"""``cut_volatile``: the gRPC front's repeat key, read from a CheckRequest's bytes in C.

What it must never do is give two requests the same key when they differ in anything but their
per-request values (that would replay one request's allow for another), or report volatile
values other than the ones the real parse (``facts_from_check_request``) finds. It may give up (None)
whenever a request is not in the form Envoy writes; the server then reads it the slow way.
The properties are checked against the real protobuf parser, on generated requests and on
byte-level mutations of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authz_server import _volatile_cut
from authz_server.envoy import CheckRequest, check_request_from_json, cut_volatile, facts_from_check_request
from authz_server.facts import VOLATILE_HEADERS, Facts, Volatile

RECORDED = Path(__file__).parents[1] / "vectors" / "opa_envoy_input" / "envoy_get_mtls.json"
FAST = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])


def recorded() -> CheckRequest:
    return check_request_from_json(json.loads(RECORDED.read_text())["request"])


def stripped_values(raw: bytes) -> tuple[bytes, Volatile] | None:
    """What the real parse finds: the fingerprint of the rest, and the volatile values."""
    request = CheckRequest()
    request.ParseFromString(raw)
    facts = facts_from_check_request(request)
    volatile = facts.attributes_factory.volatile  # type: ignore[union-attr]
    return (facts.fingerprint, volatile) if volatile is not None else None


def cut(raw: bytes) -> tuple[bytes, Volatile]:
    result = cut_volatile(raw)
    assert result is not None, "the extension gave up on a request in Envoy's form"
    return result


def with_volatile_values(request: CheckRequest, n: int) -> bytes:
    copy = CheckRequest()
    copy.CopyFrom(request)
    http = copy.attributes.request.http
    http.id = str(7 ** n)  # a different length every time
    http.headers["x-request-id"] = "r" * n
    http.headers["traceparent"] = f"00-{n:032x}-{n:016x}-01"
    copy.attributes.request.time.seconds = 1_700_000_000 + n
    copy.attributes.request.time.nanos = 10 ** (n % 9)
    copy.attributes.source.address.socket_address.port_value = 1 + 977 * n
    return copy.SerializeToString()


def test_the_extension_is_built() -> None:
    """Without it the server still works, but never replays gRPC repeats: `make install` builds it."""
    assert cut_volatile(recorded().SerializeToString()) is not None


def test_it_reads_the_same_volatile_values_as_the_parser() -> None:
    raw = recorded().SerializeToString()
    key, volatile = cut(raw)
    expected = stripped_values(raw)
    assert expected is not None and volatile == expected[1]
    assert volatile.request_id == "9437615370236484122" and volatile.port == 50312
    assert volatile.time_value == (1746100800, 123456000)
    assert dict(volatile.headers) == {"x-request-id": "3b9f2d6e-8a51-4c0f-9d1e-7f2a6c4b1e03",
                                      "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    for value in (b"9437615370236484122", b"3b9f2d6e-8a51-4c0f-9d1e-7f2a6c4b1e03", b"00-4bf92f3577b34da6a3ce929d0e0e4736"):
        assert value not in key


def test_requests_that_differ_only_in_volatile_values_share_a_key_whatever_their_lengths() -> None:
    request = recorded()
    keys = {cut(with_volatile_values(request, n))[0] for n in range(1, 12)}
    assert len(keys) == 1


@pytest.mark.parametrize("change", [
    lambda r: setattr(r.attributes.request.http, "path", "/v1/orders/43"),
    lambda r: r.attributes.request.http.headers.__setitem__("x-role", "admin"),
    lambda r: r.attributes.request.http.headers.__setitem__("x-request-id-extra", "1"),
    lambda r: r.attributes.request.http.headers.__setitem__("x-request", "1"),
    lambda r: setattr(r.attributes.request.http, "body", "{}"),
    lambda r: setattr(r.attributes.source, "principal", "spiffe://example.org/ns/shop/sa/other"),
    lambda r: setattr(r.attributes.source.address.socket_address, "address", "10.1.0.8"),
    lambda r: setattr(r.attributes.destination.address.socket_address, "port_value", 8444),
    lambda r: r.attributes.context_extensions.__setitem__("sensitivity", "low"),
    lambda r: setattr(r.attributes.tls_session, "sni", "other.svc"),
], ids=["path", "header", "header-named-like-a-volatile-one", "header-named-like-the-start-of-one", "body", "principal", "source-address",
        "destination-port", "context-extension", "sni"])
def test_a_change_anywhere_else_changes_the_key(change: Any) -> None:
    request = recorded()
    changed = CheckRequest()
    changed.CopyFrom(request)
    change(changed)
    assert cut(changed.SerializeToString())[0] != cut(request.SerializeToString())[0]


def test_where_a_field_sits_is_part_of_the_key() -> None:
    """The same bytes as the source's ``service`` or as the ``destination`` after an empty
    source: the messages the walk goes into keep their lengths (of what is left of them)."""
    inside = b"\x0a\x07" + b"\x0a\x05" + b"\x12\x03\x12\x01a"  # source{service: "\x12\x01a"}
    after = b"\x0a\x07" + b"\x0a\x00" + b"\x12\x03\x12\x01a"  # source{}, destination{service: "a"}
    for raw in (inside, after):
        CheckRequest().ParseFromString(raw)  # both are well-formed
    assert cut(inside)[0] != cut(after)[0]


def _encoded(changes: Any) -> bytes:
    request = recorded()
    changes(request)
    return request.SerializeToString()


@pytest.mark.parametrize("raw", [
    _encoded(lambda r: r.attributes.request.http.header_map.headers.add(key="x-request-id", raw_value=b"1")),
    _encoded(lambda r: setattr(r.attributes.source.address.socket_address, "named_port", "https")),
    _encoded(lambda r: None) + recorded().SerializeToString(),  # attributes twice: upb would merge them
    _encoded(lambda r: None) + b"\x0a\x0a\x22\x08\x12\x06\x0a\x04\xff\xfe\xfd\xfc",  # a request id that is not UTF-8
    _encoded(lambda r: None) + b"\x0b",  # a group tag
    _encoded(lambda r: None)[:-1],  # truncated
], ids=["raw-headers-form", "named-port", "merged-attributes", "bad-utf8-id", "group", "truncated"])
def test_it_gives_up_on_what_is_not_in_envoys_form(raw: bytes) -> None:
    assert cut_volatile(raw) is None


# -- properties against the real parser

_names = st.sampled_from(sorted(VOLATILE_HEADERS) + ["x-role", "accept", ":path", "x-request", "user-agent"])
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def check_requests(draw: st.DrawFn) -> bytes:
    request = CheckRequest()
    attributes = request.attributes
    http = attributes.request.http
    for name, value in draw(st.dictionaries(_names, _text, max_size=6)).items():
        http.headers[name] = value
    if draw(st.booleans()):
        http.id = draw(_text)
    http.path = draw(st.sampled_from(["/", "/a", "/b?x=1"]))
    http.body = draw(st.sampled_from(["", "{}", "a=1"]))
    if draw(st.booleans()):
        attributes.request.time.seconds = draw(st.integers(-(2 ** 40), 2 ** 40))
        attributes.request.time.nanos = draw(st.integers(-999_999_999, 999_999_999))
    if draw(st.booleans()):
        attributes.source.address.socket_address.address = draw(st.sampled_from(["10.0.0.1", "::1"]))
        attributes.source.address.socket_address.port_value = draw(st.integers(0, 2 ** 32 - 1))
    elif draw(st.booleans()):
        attributes.source.address.pipe.path = "/run/envoy.sock"
    if draw(st.booleans()):
        attributes.source.principal = draw(st.sampled_from(["spiffe://a/x", "spiffe://b/y"]))
    if draw(st.booleans()):
        attributes.context_extensions["tier"] = draw(st.sampled_from(["gold", "free"]))
    return request.SerializeToString(deterministic=draw(st.booleans()))


def _mutated(raw: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "none"]))
    if kind == "none" or not raw:
        return raw
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        return raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
    if kind == "insert":
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    return raw[:at] + raw[at + data.draw(st.integers(1, 4)):]


def _parsed(raw: bytes) -> tuple[bytes, Volatile] | None:
    try:
        return stripped_values(raw)
    except Exception:  # what the server denies as a malformed request
        return None


@FAST
@given(check_requests(), st.data())
def test_the_values_it_reads_are_the_parsers(raw: bytes, data: st.DataObject) -> None:
    raw = _mutated(raw, data)
    result = cut_volatile(raw)
    if result is None:
        return
    parsed = _parsed(raw)
    assume(parsed is not None)  # non-volatile garbage is the parser's to refuse, on a miss
    assert result[1] == parsed[1]


@FAST
@given(check_requests(), check_requests(), st.data())
def test_two_requests_share_a_key_only_when_they_differ_in_volatile_values_alone(
        first: bytes, second: bytes, data: st.DataObject) -> None:
    """Same key ⇒ same fingerprint (the real parse, volatile values taken out). The pair is made
    to collide often: the second request is the first with new volatile values, or mutated."""
    if data.draw(st.booleans()):
        request = CheckRequest()
        request.ParseFromString(first)
        n = data.draw(st.integers(1, 40))
        second = with_volatile_values(request, n)
    first, second = _mutated(first, data), _mutated(second, data)
    one, other = cut_volatile(first), cut_volatile(second)
    if one is None or other is None or one[0] != other[0]:
        return
    parsed_one, parsed_other = _parsed(first), _parsed(second)
    assume(parsed_one is not None)
    assert parsed_other is not None, "a repeat of a request that parses must parse too"
    assert parsed_one[0] == parsed_other[0]


@FAST
@given(st.binary(max_size=200))
def test_any_bytes_give_a_key_or_none(raw: bytes) -> None:
    result = cut_volatile(raw)
    assert result is None or (isinstance(result[0], bytes) and isinstance(result[1], Volatile))


# -- the audit log's shape key, read from the repeat key (``_volatile_cut.shape``)

# What changes within a shape (the method, path, headers and volatile values), and the rest;
# each from a few values, so that two drawn requests often share one part.
_within_shape = st.fixed_dictionaries({
    "method": st.sampled_from(["", "GET", "POST"]), "path": st.sampled_from(["", "/", "/a?x=1"]),
    "headers": st.dictionaries(st.sampled_from(["x-role", "accept", ":path", *sorted(VOLATILE_HEADERS)]),
                               st.sampled_from(["", "a", "b"]), max_size=4),
    "id": st.sampled_from(["", "1", "22"]), "time": st.sampled_from([None, 0, 1_700_000_000]),
    "port": st.sampled_from([0, 1, 40000])})
_rest_of_shape = st.fixed_dictionaries({
    "source": st.sampled_from(["socket", "pipe", "none"]), "principal": st.sampled_from(["", "spiffe://a/x"]),
    "host": st.sampled_from(["", "api"]), "body": st.sampled_from(["", "{}"]),
    "extensions": st.sampled_from([(), ("tier",), ("tier", "zone")]), "destination": st.booleans(),
    "sni": st.booleans()})


def shaped_request(within: dict[str, Any], rest: dict[str, Any]) -> bytes:
    """A request as Envoy writes it (one field order: maps are written sorted here)."""
    request = CheckRequest()
    attributes = request.attributes
    http = attributes.request.http
    http.method, http.path, http.id = within["method"], within["path"], within["id"]
    for name, value in within["headers"].items():
        http.headers[name] = value
    if within["time"] is not None:
        attributes.request.time.seconds = within["time"]
    if rest["source"] == "socket":
        attributes.source.address.socket_address.address = "10.0.0.1"
        attributes.source.address.socket_address.port_value = within["port"]
    elif rest["source"] == "pipe":
        attributes.source.address.pipe.path = "/run/envoy.sock"
    attributes.source.principal = rest["principal"]
    http.host, http.body = rest["host"], rest["body"]
    for key in rest["extensions"]:
        attributes.context_extensions[key] = "v"
    if rest["destination"]:
        attributes.destination.address.socket_address.port_value = 8000
    if rest["sni"]:
        attributes.tls_session.sni = "api.svc"
    return request.SerializeToString(deterministic=True)


def read_as_served(raw: bytes, *, with_key: bool = True) -> Facts:
    """As the gRPC front reads a request: with its repeat key (the shape then read in C), or
    without one (too large to be kept: the shape read from the parsed message)."""
    request = CheckRequest()
    request.ParseFromString(raw)
    key = cut(raw)[0] if with_key else None
    return facts_from_check_request(request, key)


def _rest(facts: Facts) -> dict[str, Any]:
    """What a shape key must determine: the stable attributes without the method, path and headers."""
    attributes = facts.attributes_factory.stable_attributes()  # type: ignore[union-attr]
    http = dict(attributes.get("request", {}).get("http", {}))
    present = tuple(http.pop(name, None) is not None for name in ("method", "path", "headers"))
    return {**attributes, "request": {**attributes.get("request", {}), "http": http}, "present": present}


def shape_key(facts: Facts) -> Any:
    shape = facts.attributes_factory.shape()  # type: ignore[union-attr]
    assert shape is not None
    return shape[0]


def test_the_shape_key_of_a_repeat_key_leaves_out_the_method_path_and_headers() -> None:
    request = recorded()
    changed = CheckRequest()
    changed.CopyFrom(request)
    http = changed.attributes.request.http
    http.method, http.path = "POST", "/v1/orders/43?page=2"
    http.headers["x-role"] = "admin"
    repeat = CheckRequest()
    repeat.ParseFromString(with_volatile_values(changed, 3))
    # (in one field order, as Envoy writes them: a copied upb map may list its keys in another)
    keys = {shape_key(read_as_served(message.SerializeToString(deterministic=True)))
            for message in (request, changed, repeat)}
    assert len(keys) == 1
    (key,) = keys
    assert isinstance(key, tuple)  # a C key: never equal to a Python one (bytes)
    assert isinstance(shape_key(read_as_served(request.SerializeToString(), with_key=False)), bytes)


@FAST
@given(_within_shape, _within_shape, _rest_of_shape, st.one_of(st.none(), _rest_of_shape))
def test_read_from_the_repeat_key_or_the_message_two_requests_share_a_shape_alike(
        within: dict[str, Any], other_within: dict[str, Any], rest: dict[str, Any],
        other_rest: dict[str, Any] | None) -> None:
    """C key equality ⇔ Python key equality, on requests as Envoy writes them; and a shared C
    key means the same attributes but for the method, path, headers and volatile values. The
    second request has the first's rest of the shape half the time."""
    first, second = shaped_request(within, rest), shaped_request(other_within, other_rest or rest)
    c_keys = [shape_key(read_as_served(raw)) for raw in (first, second)]
    python_keys = [shape_key(read_as_served(raw, with_key=False)) for raw in (first, second)]
    assert (c_keys[0] == c_keys[1]) == (python_keys[0] == python_keys[1])
    if c_keys[0] == c_keys[1]:
        assert _rest(read_as_served(first)) == _rest(read_as_served(second))


@FAST
@given(_within_shape, _rest_of_shape, st.booleans())
def test_the_shape_given_the_facts_is_the_shape_read_from_the_message(
        within: dict[str, Any], rest: dict[str, Any], with_key: bool) -> None:
    """The audit log passes the facts (their method, path and headers are the message's own,
    not read again): the same shape as read from the message, headers in the same order."""
    facts = read_as_served(shaped_request(within, rest), with_key=with_key)
    factory = facts.attributes_factory
    given_facts, read = factory.shape(facts), factory.shape()  # type: ignore[union-attr]
    assert given_facts is not None and read is not None
    assert given_facts[:3] == read[:3]
    assert list(given_facts[3].items()) == list(read[3].items())


def test_a_repeat_key_the_c_shape_cannot_read_falls_back_to_the_message() -> None:
    raw = recorded().SerializeToString()
    request = CheckRequest()
    request.ParseFromString(raw)
    facts = facts_from_check_request(request, b"\x0b")  # a group tag: not in cut()'s form
    assert shape_key(facts) == shape_key(read_as_served(raw, with_key=False))


@FAST
@given(check_requests(), st.data())
def test_the_c_shape_reads_any_bytes_to_a_key_or_none(raw: bytes, data: st.DataObject) -> None:
    result = cut_volatile(raw)
    if result is None:
        return
    shape = _volatile_cut.shape(_mutated(result[0], data))
    assert shape is None or isinstance(shape, bytes)


def _parsed_with_key(raw: bytes) -> Facts | None:
    result = cut_volatile(raw)
    if result is None:
        return None
    request = CheckRequest()
    try:
        request.ParseFromString(raw)
    except Exception:  # what the server denies as a malformed request
        return None
    return facts_from_check_request(request, result[0])


@FAST
@given(check_requests(), check_requests(), st.data())
def test_on_any_bytes_the_cut_reads_a_shared_c_shape_means_the_same_request_but_for_what_shapes_leave_out(
        first: bytes, second: bytes, data: st.DataObject) -> None:
    """Same C shape key ⇒ same attributes but for the method, path, headers and volatile
    values, on mutated requests too (fields repeated, odd wire types). The second request is
    often the first with those changed."""
    if data.draw(st.booleans()):
        request = CheckRequest()
        request.ParseFromString(first)
        http = request.attributes.request.http
        http.method = data.draw(st.sampled_from(["", "GET", "DELETE"]))
        http.path = data.draw(st.sampled_from(["", "/", "/z?q=1"]))
        http.headers["x-role"] = data.draw(st.sampled_from(["", "admin"]))
        second = with_volatile_values(request, data.draw(st.integers(1, 40)))
    facts = [_parsed_with_key(_mutated(raw, data) if data.draw(st.booleans()) else raw) for raw in (first, second)]
    if facts[0] is None or facts[1] is None:
        return
    keys = [shape_key(one) for one in facts]
    if isinstance(keys[0], tuple) and keys[0] == keys[1]:
        assert _rest(facts[0]) == _rest(facts[1])
