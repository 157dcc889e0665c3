"""Redaction: what an auditor still sees, and (property-based) that no secret survives."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server.audit.redact import (REDACTED, TOKEN_PARAMETERS, Redactor, redact_cookie, redact_header,
                                       redact_set_cookie, scrub_text)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_like(secret: str) -> str:
    return ".".join([b64url(b'{"alg":"HS256","typ":"JWT"}'), b64url(json.dumps({"sub": secret}).encode()),
                     b64url(secret.encode())])


def record(headers: dict[str, str], *, path: str = "/p", identity: dict | None = None, **input_extra) -> dict:
    return {"decision_id": "d1", "input": {
        "attributes": {"request": {"http": {"method": "GET", "path": path, "headers": headers}}},
        "identity": identity or {}, **input_extra}, "result": True, "message": "allowed"}


def test_auditor_keeps_schemes_cookie_names_and_attributes() -> None:
    assert redact_header("Authorization", "Bearer abc.def.ghi") == f"Bearer {REDACTED}"
    assert redact_header("proxy-authorization", "Basic dXNlcjpwYXNz") == f"Basic {REDACTED}"
    assert redact_header("authorization", "opaque-without-scheme") == REDACTED
    assert redact_cookie("theme=dark; __Host-authz-session=abc; bare") == \
        f"theme={REDACTED}; __Host-authz-session={REDACTED}; {REDACTED}"
    assert redact_set_cookie("sid=a,b; Path=/; Expires=Wed, 21 Oct 2015 07:28:00 GMT, other=x=y; HttpOnly") == \
        f"sid={REDACTED},{REDACTED}; Path=/; Expires=Wed, 21 Oct 2015 07:28:00 GMT, other={REDACTED}; HttpOnly"
    assert redact_header("x-session-id", "s3cr3t") == REDACTED
    assert redact_header("x-forwarded-access-token", "t") == REDACTED
    assert redact_header("user-agent", "curl/8.5.0") == "curl/8.5.0"


def test_text_shapes() -> None:
    token = jwt_like("alice")
    assert scrub_text(f"before {token} after") == f"before {REDACTED} after"
    assert scrub_text("https://a.test/cb?state=1&ACCESS_TOKEN=xyz&page=2#id_token=q") == \
        f"https://a.test/cb?state=1&ACCESS_TOKEN={REDACTED}&page=2#id_token={REDACTED}"
    assert scrub_text("forwarded: Bearer opaque-1234567") == f"forwarded: Bearer {REDACTED}"
    assert scrub_text('{"refresh_token": "a\\"b", "n": 1}') == f'{{"refresh_token": "{REDACTED}", "n": 1}}'
    # Messages that merely talk about tokens stay readable.
    assert scrub_text("bearer token over 16384 bytes") == "bearer token over 16384 bytes"
    assert scrub_text("tokenizer=on&page=2") == "tokenizer=on&page=2"


def test_places_in_the_input_document() -> None:
    raw = base64.b64encode(b"Bearer opaque-secret-1").decode()
    original = record(
        {"authorization": "Bearer opaque-secret-0", "x-request-id": "r1"}, path="/p?token=abc&x=1",
        identity={"method": "session", "session": {"id_sha256": "ab" * 32, "created": 1.0, "expires": 2.0,
                                                   "bound_to": {"spiffe_id": "spiffe://e.org/w"},
                                                   "id": "raw-session-id-1"}},
        parsed_query={"token": ["abc"], "x": ["1"]},
        parsed_body={"user": {"password": "hunter2", "name": "bob"}, "items": [{"client_secret": "s"}]},
    )
    original["input"]["attributes"]["request"]["http"]["headerMap"] = {
        "headers": [{"key": "authorization", "rawValue": raw}, {"key": "accept", "value": "*/*"}]}
    original["result"] = {"allowed": True, "headers": {"x-session-id": "new-session-id"}}
    before = copy.deepcopy(original)
    out = Redactor().redact(original)
    assert original == before  # never in place: decision.input is what the policy saw
    http = out["input"]["attributes"]["request"]["http"]
    assert http["headers"] == {"authorization": f"Bearer {REDACTED}", "x-request-id": "r1"}
    assert http["path"] == f"/p?token={REDACTED}&x=1"
    assert base64.b64decode(http["headerMap"]["headers"][0]["rawValue"]) == f"Bearer {REDACTED}".encode()
    assert http["headerMap"]["headers"][1] == {"key": "accept", "value": "*/*"}
    assert out["input"]["parsed_query"] == {"token": [REDACTED], "x": ["1"]}
    assert out["input"]["parsed_body"] == {"user": {"password": REDACTED, "name": "bob"},
                                           "items": [{"client_secret": REDACTED}]}
    assert set(out["input"]["identity"]["session"]) == {"id_sha256", "created", "expires", "bound_to"}
    assert out["result"]["headers"]["x-session-id"] == REDACTED
    assert out["erased"] == ["/input/identity/session/id"]
    assert "/input/attributes/request/http/headers/authorization" in out["masked"]
    assert "/input/parsed_body/user/password" in out["masked"]


# -- property: whatever the secret and wherever we put it, it does not come out

secrets = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=12,
                  max_size=48).filter(lambda s: any(c.isdigit() for c in s) and any(c.isalpha() for c in s))
cookie_names = st.text(alphabet="abcdefghij_", min_size=1, max_size=8)
odd_header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=3, max_size=16).map(lambda s: "x-" + s)
schemes = st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "DPoP", "Negotiate"])
params = st.sampled_from(sorted(TOKEN_PARAMETERS)).flatmap(
    lambda name: st.sampled_from([name, name.upper(), name.title()]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(secret=secrets, scheme=schemes, cookie=cookie_names, other_cookie=cookie_names, odd=odd_header_names,
       param=params, place=st.integers(0, 11))
def test_no_secret_survives(secret: str, scheme: str, cookie: str, other_cookie: str, odd: str, param: str,
                            place: int) -> None:
    headers = {"accept": "*/*", "user-agent": "test/1.0"}
    path = "/orders/1"
    extra: dict = {}
    identity: dict = {}
    header_map = None
    if place == 0:
        headers["authorization"] = f"{scheme} {secret}"
    elif place == 1:
        headers["proxy-authorization"] = f"{scheme} {secret}"
    elif place == 2:
        headers["cookie"] = f"{other_cookie}=v; {cookie}={secret}; z={secret}=="
    elif place == 3:
        headers["set-cookie"] = f"{cookie}={secret}; Path=/; Secure, {other_cookie}={secret}; HttpOnly"
    elif place == 4:
        headers["x-session-id"] = secret
    elif place == 5:
        headers[odd] = jwt_like(secret)
    elif place == 6:
        headers[odd] = f"{scheme} {secret}"
    elif place == 7:
        path = f"/orders/1?a=1&{param}={secret}"
        extra["parsed_query"] = {"a": ["1"], param: [secret]}
    elif place == 8:
        headers["referer"] = f"https://app.test/cb?x=1&{param}={secret}"
    elif place == 9:
        identity = {"session": {"id_sha256": "00" * 32, "id": secret, "raw": {"value": secret}}}
    elif place == 10:
        header_map = {"headers": [{"key": "authorization",
                                   "rawValue": base64.b64encode(f"{scheme} {secret}".encode()).decode()},
                                  {"key": odd, "rawValue": base64.b64encode(jwt_like(secret).encode()).decode()}]}
    else:
        extra["parsed_body"] = {"form": {param: secret}, "list": [{param: [secret]}]}
        extra["body"] = json.dumps({param: secret})
    doc = record(headers, path=path, identity=identity, **extra)
    if header_map is not None:
        doc["input"]["attributes"]["request"]["http"]["headerMap"] = header_map
    out = json.dumps(Redactor().redact(doc))
    assert secret not in out
    assert jwt_like(secret) not in out
    for encoded in (base64.b64encode(f"{scheme} {secret}".encode()).decode(), b64url(secret.encode())):
        assert encoded not in out


def test_authorization_code_is_redacted() -> None:
    """The browser sign-in callback (``/_authz/callback?code=...&state=...``, RFC 6749 § 4.1.2)
    and the token request's form body carry the authorization code: it goes, ``state`` stays."""
    code = "SplxlOBeZQQYbYS6WxSbIA"
    path = f"/_authz/callback?code={code}&state=af0ifjsldkj"
    original = record({"accept": "text/html", "referer": f"https://idp.test/authorize?x=1&code={code}"}, path=path,
                      parsed_query={"code": [code], "state": ["af0ifjsldkj"]},
                      parsed_body={"grant_type": "authorization_code", "code": code})
    out = Redactor().redact(original)
    http = out["input"]["attributes"]["request"]["http"]
    assert http["path"] == f"/_authz/callback?code={REDACTED}&state=af0ifjsldkj"
    assert http["headers"]["referer"] == f"https://idp.test/authorize?x=1&code={REDACTED}"
    assert out["input"]["parsed_query"] == {"code": [REDACTED], "state": ["af0ifjsldkj"]}
    assert out["input"]["parsed_body"] == {"grant_type": "authorization_code", "code": REDACTED}
    assert code not in json.dumps(out)
    assert "/input/parsed_query/code" in out["masked"]
    # a word that merely starts with it is not the parameter
    assert scrub_text("https://a.test/?codec=h264&page=2") == "https://a.test/?codec=h264&page=2"


# The headers loop of redact_request: in C when the extension is built, in Python otherwise; the same.
_header_names = st.sampled_from(["authorization", "cookie", "set-cookie", "x-session-id", "x-api-token", "user-agent",
                                 ":path", ":method", "accept", "x-note", "Authorization", "x-Secret-thing", "é"])
_header_values = st.one_of(st.sampled_from(["Bearer " + jwt_like("s3cr3t"), "a=1; b=2", "short", "/orders/1?code=abc",
                                            "token=abcdefgh1 and more", "plain words here", "", "[REDACTED]"]),
                           st.text(max_size=24))


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(_header_names, _header_values, max_size=8), path=_header_values)
def test_the_c_headers_loop_is_the_python_one(headers: dict[str, str], path: str) -> None:
    from authz_server import _volatile_cut
    from authz_server.audit.redact import _redact_headers, header_rule
    from authz_server.envoy import CheckRequest

    redacted_path = scrub_text(path)
    expected = _redact_headers(headers, path, redacted_path, header_rule, scrub_text)
    done = _volatile_cut.redact_headers(headers, path, redacted_path, header_rule, scrub_text)
    assert done is not None
    assert list(done[0].items()) == list(expected[0].items()) and done[1] == expected[1]
    message = CheckRequest()  # a protobuf map, as the gRPC front gives them, in its own order
    message.attributes.request.http.headers.update(headers)
    upb = message.attributes.request.http.headers
    done = _volatile_cut.redact_headers(upb, path, redacted_path, header_rule, scrub_text)
    expected = _redact_headers(upb, path, redacted_path, header_rule, scrub_text)
    assert done is not None
    assert list(done[0].items()) == list(expected[0].items()) and done[1] == expected[1]


def test_the_c_headers_loop_leaves_what_is_not_a_string_to_python() -> None:
    from authz_server import _volatile_cut
    from authz_server.audit.redact import header_rule

    assert _volatile_cut.redact_headers({"a": 1}, "/", "/", header_rule, scrub_text) is None
    assert _volatile_cut.redact_headers({"a": "b"}, None, "/", header_rule, scrub_text) is None


def test_redact_request_without_the_c_loop_is_the_same(monkeypatch) -> None:
    from authz_server.audit import redact

    headers = {"authorization": "Bearer " + jwt_like("s3cr3t"), ":path": "/o?code=abcdefgh", "accept": "x",
               "user-agent": "curl/8.5.0 token=abcdefgh1", "x-session-id": "sess-1234567890"}
    args = ("GET", "/o?code=abcdefgh", headers, ["o"], {"code": ["abcdefgh"]}, None)
    with_c = [Redactor().redact_request(*args, path_first=first) for first in (False, True)]
    assert with_c[0].masked[-2] == with_c[1].masked[0] == "/input/attributes/request/http/path"
    monkeypatch.setattr(redact, "redact_headers", redact._redact_headers)
    assert [Redactor().redact_request(*args, path_first=first) for first in (False, True)] == with_c


# An inert request's changing members rendered in C: the bytes redact_request and orjson make, or None.
_path_characters = st.sampled_from(list("abcXYZ019_~-/?&=") + ["%", "+", ";", "é", " ", "#", ".", "\x00"])
_query_names = st.sampled_from(["page", "Code", "TOKEN", "state", "q", "", "access_token", "x" * 70])
_inert_paths = st.builds(lambda segments, query: "/".join(segments) + (
    "?" + "&".join(f"{name}={value}" if value is not None else name for name, value in query) if query else ""),
    st.lists(st.sampled_from(["", "orders", "a1_b~c-d", "123"]), max_size=5),
    st.lists(st.tuples(_query_names, st.one_of(st.none(), st.sampled_from(["", "1", "a-b~_9"]))), max_size=5))
_any_paths = st.one_of(_inert_paths, st.text(_path_characters, max_size=24))
_any_text = st.text(st.one_of(st.characters(max_codepoint=0x7f), st.characters()), max_size=24)


@settings(max_examples=500, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PURGE-IT", "G\"T", "é", ""]), path=_any_paths,
       headers=st.dictionaries(st.one_of(_header_names, _any_text), st.one_of(_header_values, _any_text),
                               max_size=8),
       path_header=st.booleans())
def test_an_inert_request_rendered_in_c_is_what_redact_request_and_orjson_make(
        method: str, path: str, headers: dict[str, str], path_header: bool) -> None:
    import orjson

    from authz_server.audit.redact import _INERT_PATH, render_inert_request
    from authz_server.envoy import CheckRequest
    from authz_server.errors import AuthzError
    from authz_server.facts import parse_path_and_query

    if path_header:
        headers = {**headers, ":path": path}
    maps: list[Any] = [headers]  # a dict's order is the HTTP front's
    message = CheckRequest()  # a protobuf map, as the gRPC front gives them, in its own order
    try:
        message.attributes.request.http.headers.update(headers)
        maps.append(message.attributes.request.http.headers)
    except (UnicodeEncodeError, ValueError):  # upb holds UTF-8 only
        pass
    for given_headers in maps:
        done = render_inert_request(method, path, given_headers)
        try:
            parsed_path, parsed_query = parse_path_and_query(path)
        except AuthzError:
            assert done is None
            continue
        inert = (_INERT_PATH.fullmatch(path) is not None and len(method) < 8
                 and TOKEN_PARAMETERS.isdisjoint(map(str.lower, parsed_query)))
        redacted = Redactor().redact_request(method, path, given_headers, parsed_path, parsed_query, None)
        try:
            expected = tuple(orjson.dumps(redacted.members[name]) for name in
                             ("headers", "method", "path", "parsed_path", "parsed_query"))
        except orjson.JSONEncodeError:  # a lone surrogate: the whole path says so
            assert done is None
            continue
        if not inert:
            assert done is None
            continue
        assert done == (expected, redacted.masked)
        assert redacted.members["parsed_path"] is parsed_path and redacted.members["path"] == path


def test_what_the_c_rendering_leaves_to_python() -> None:
    from authz_server.audit.redact import header_rule, render_inert_request

    assert render_inert_request("GET", "/a?token=x", {}) is None  # a credential's name: scrubbed in Python
    assert render_inert_request("GET", "/a%2Fb", {}) is None  # escapes to unescape
    assert render_inert_request("GET", "/a", {"x": "\ud800"}) is None  # orjson refuses it
    assert render_inert_request("GET", "/a", {"x": 1}) is None  # type: ignore[dict-item]
    assert render_inert_request("GET", "/" + "&" * 300, {}) is None
    from authz_server import _volatile_cut

    assert _volatile_cut.render_inert_request("GET", "/a?" + "&".join(["q=1"] * 300), {}, header_rule, scrub_text,
                                              TOKEN_PARAMETERS) is None  # more pairs than it keeps: Python
    assert _volatile_cut.render_inert_request("GET", "/a?q=1&q=2&p", {":path": "/a?q=1&q=2&p"}, header_rule,
                                              scrub_text, TOKEN_PARAMETERS) == (
        b'{":path":"/a?q=1&q=2&p"}', b'"GET"', b'"/a?q=1&q=2&p"', b'["a"]', b'{"q":["1","2"],"p":[""]}', [])


@given(text=st.text(alphabet=st.characters(blacklist_characters='. \t="'), max_size=80))
@settings(max_examples=300, deadline=None)
def test_scrub_text_leaves_a_string_without_its_triggers_as_it_is(text: str) -> None:
    """The C form of a record skips scrub_text for a string with no '.', space, tab, '=' or
    '"' (``scrub_cannot_change`` in _volatile_cut.c): nothing else makes it change a string."""
    assert scrub_text(text) == text
    assert scrub_text(f"ey{text}") == f"ey{text}"
