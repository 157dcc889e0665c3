"""The input document, exactly as the OPA-Envoy plugin builds it, for recorded CheckRequests.

Each file in ``tests/vectors/opa_envoy_input/`` holds a CheckRequest in protobuf JSON and the
input document a policy must see for it (the README names each file's source). The request
goes through the server's own path: protobuf bytes, ``parse_check_request``,
``facts_from_check_request`` (which moves the volatile fields out for the cache key), then
``build_input``. Then the requests OPA-Envoy answers with 400.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_server.decision import Pipeline
from authz_server.envoy import check_request_from_json, facts_from_check_request, parse_check_request
from authz_server.errors import RequestError
from authz_server.facts import _unescape, build_input, parse_query
from authz_server.policy.inputs import input_paths
from authz_server.trees import project
from authz_server.policy.loader import PolicyRuntime
from tests.support.authz import REPO, write_policy

VECTORS = REPO / "tests" / "vectors" / "opa_envoy_input"
FILES = sorted(VECTORS.glob("*.json"))


def same(actual: Any, expected: Any, where: str = "input") -> None:
    """JSON equality that does not let ``True == 1`` or ``{} == []`` pass (numbers compare by value)."""
    if isinstance(expected, bool) or expected is None:
        assert actual is expected, f"{where}: {actual!r} is not {expected!r}"
    elif isinstance(expected, (int, float)):
        assert type(actual) in (int, float) and actual == expected, f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, str):
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            same(a, e, f"{where}[{index}]")
    else:
        assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            same(actual[key], expected[key], f"{where}.{key}")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_every_vector_is_listed_in_the_readme() -> None:
    readme = (VECTORS / "README.md").read_text()
    assert len(FILES) >= 12
    for path in FILES:
        assert f"`{path.name}`" in readme, f"{path.name} has no line in the README"
        assert load(path)["source"]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_input_document_matches_the_recording(path: Path) -> None:
    vector = load(path)
    raw = check_request_from_json(vector["request"]).SerializeToString()
    facts = facts_from_check_request(parse_check_request(raw))
    document = build_input(facts, {}, {})
    same(document, vector["input"])
    same(build_input(facts, {}, {}), vector["input"])  # the facts are not used up by building once
    json.dumps(document, allow_nan=False)  # what the audit log writes: plain JSON


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_policy_reading_a_few_fields_gets_exactly_those(path: Path) -> None:
    vector = load(path)
    tree = input_paths({"p.rego": "package p\nimport rego.v1\nallow if {\n"
                                  "  input.attributes.request.http.headers[\"x-request-id\"]\n"
                                  "  input.attributes.source.address.socketAddress.portValue\n"
                                  "  input.attributes.request.http.id\n  input.parsed_body.firstname\n"
                                  "  input.attributes.contextExtensions.service\n}\n"})
    assert tree is not None
    facts = facts_from_check_request(check_request_from_json(vector["request"]))
    partial = build_input(facts, {}, {}, tree)
    same(project(partial, tree), project(vector["input"], tree))


# -- what OPA-Envoy answers with 400 (it fails RequestToInput), whether or not the policy reads it

def http(path: str = "/", headers: dict[str, str] | None = None, body: str = "") -> dict[str, Any]:
    fields: dict[str, Any] = {"method": "POST", "path": path, "headers": headers or {}}
    if body:
        fields["body"] = body
    return {"attributes": {"request": {"http": fields}}}


JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
MULTIPART = {"content-type": "multipart/form-data; boundary=foo"}

BAD_REQUESTS = {
    # url.PathUnescape: "%" not followed by two hex digits
    "path %zz": (http("/a%zz"), "bad_path"),
    "path ends in %": (http("/a%"), "bad_path"),
    "path %4 then /": (http("/a%4/b"), "bad_path"),
    # url.ParseQuery
    "query %zz": (http("/a?x=%zz"), "bad_query"),
    "query key %": (http("/a?%=1"), "bad_query"),
    "query ;": (http("/a?x=1;y=2"), "bad_query"),
    "query ; in a later pair": (http("/a?x=1&y=2;"), "bad_query"),
    # getParsedBody: the body is not what its content type says
    "json from request_test.go": (http(headers=JSON, body='["foo" : 42}'), "bad_body"),
    "json with trailing data": (http(headers=JSON, body='{"a": 1} {"b": 2}'), "bad_body"),
    "json NaN": (http(headers=JSON, body='{"a": NaN}'), "bad_body"),
    "json Infinity": (http(headers=JSON, body="-Infinity"), "bad_body"),
    "json cut short": (http(headers=JSON, body='{"a": '), "bad_body"),
    "form %zz": (http(headers=FORM, body="a=%zz"), "bad_query"),
    "form ;": (http(headers=FORM, body="a=1;b=2"), "bad_query"),
    "multipart without its boundary": (http(headers=MULTIPART, body="no parts here"), "bad_body"),
    "multipart json part": (http(headers=MULTIPART, body='--foo\nContent-Disposition: form-data; name="j"\n'
                                                         'Content-Type: application/json\n\n{oops\n--foo--\n'),
                            "bad_body"),
    # checkIfHTTPBodyTruncated: strconv.ParseInt(content-length, 10, 64)
    "content-length not a number": (http(headers={**JSON, "content-length": "ten"}, body="{}"), "bad_request"),
    "content-length with a space": (http(headers={**JSON, "content-length": " 2"}, body="{}"), "bad_request"),
    "content-length 1_0": (http(headers={**JSON, "content-length": "1_0"}, body="{}"), "bad_request"),
    "content-length over int64": (http(headers={**FORM, "content-length": "9" * 30}, body="a=1"), "bad_request"),
}


@pytest.mark.parametrize(("request_json", "code"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_requests_opa_envoy_refuses(request_json: dict[str, Any], code: str) -> None:
    facts = facts_from_check_request(check_request_from_json(request_json))
    with pytest.raises(RequestError) as error:
        build_input(facts, {}, {})
    assert error.value.code == code
    assert error.value.status == 400


ACCEPTED = {
    "escaped slash": ("/a%2Fb", ["a", "b"], {}),
    "plus and space": ("/a+b?c=d+e", ["a+b"], {"c": ["d e"]}),
    "empty pairs": ("/x?&&a&=b&", ["x"], {"a": [""], "": ["b"]}),
    "semicolon in the path": ("/a;b?c", ["a;b"], {"c": [""]}),
    "content-length +4": ("/", [""], {}),
    "no path": ("", [""], {}),
    "non-ASCII": ("/caf%C3%A9?q=%E2%82%AC", ["café"], {"q": ["€"]}),
}


@pytest.mark.parametrize(("path", "parsed_path", "parsed_query"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_what_go_net_url_accepts(path: str, parsed_path: list[str], parsed_query: dict[str, Any]) -> None:
    document = build_input(facts_from_check_request(check_request_from_json(
        http(path, {**JSON, "content-length": "+4"}, "true"))), {}, {})
    same(document["parsed_path"], parsed_path)
    same(document["parsed_query"], parsed_query)
    same(document["parsed_body"], True)


def each_part_unescaped(query: str) -> dict[str, list[str]] | str:
    """``parse_query`` as Go's ParseQuery is written: every name and value unescaped; the
    error code when it refuses."""
    result: dict[str, list[str]] = {}
    try:
        for part in query.split("&"):
            if ";" in part:
                raise RequestError("semicolon", code="bad_query")
            if part:
                key, _, value = part.partition("=")
                result.setdefault(_unescape(key, plus_is_space=True, what="query"), []).append(
                    _unescape(value, plus_is_space=True, what="query"))
    except RequestError as exc:
        return exc.code
    return result


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from("ab=&%+;2F é"), max_size=16))
def test_a_query_without_escapes_is_read_as_one_with_them(query: str) -> None:
    """``parse_query`` skips unescaping a query that holds no ``%`` or ``+``: the same pairs."""
    try:
        parsed: dict[str, list[str]] | str = parse_query(query)
    except RequestError as exc:
        parsed = exc.code
    assert parsed == each_part_unescaped(query)


def test_a_bad_request_is_a_400_even_when_the_policy_never_reads_that_part(tmp_path: Path) -> None:
    write_policy(tmp_path, "package envoy.authz\nimport rego.v1\nallow if input.attributes.request.http.method\n")
    runtime = PolicyRuntime(str(tmp_path), isolation="inline")
    runtime.load()
    try:
        pipeline = Pipeline(runtime)
        for request_json, code in BAD_REQUESTS.values():
            facts = facts_from_check_request(check_request_from_json(request_json))
            decision = asyncio.run(pipeline.decide(facts, now=1.0))
            assert (decision.allowed, decision.code, decision.http_status, decision.phase) == (
                False, code, 400, "request")
        good = asyncio.run(pipeline.decide(facts_from_check_request(check_request_from_json(http())), now=1.0))
        assert good.allowed
    finally:
        runtime.close()
