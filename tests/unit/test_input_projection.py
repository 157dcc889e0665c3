"""The engine only gets the parts of input a policy reads, and decides exactly as with all of it."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.facts import build_input
from authz_server.policy.engine import CompiledPolicy, encode_input
from authz_server.policy.inputs import input_paths
from authz_server.trees import project
from authz_server.policy.source import load_policy_set
from tests.support.authz import REPO, TUTORIAL_POLICY


def paths(source: str):  # type: ignore[no-untyped-def]
    return input_paths({"p.rego": source})


def test_direct_references_and_import_aliases() -> None:
    tree = paths('package x\nimport input.attributes.request.http as h\nimport input.parsed_query\n'
                 'allow if { h.headers["x-a"] == "1"; parsed_query.z; input.attributes.source.principal }\n')
    assert tree == {"attributes": {"request": {"http": {"headers": {"x-a": True}}}, "source": {"principal": True}},
                    "parsed_query": {"z": True}}


def test_dynamic_keys_keep_the_subtree() -> None:
    assert paths('package x\nallow if { some k; input.attributes.request.http.headers[k] == "v" }') == {
        "attributes": {"request": {"http": {"headers": True}}}}


def test_whole_input_when_it_cannot_follow() -> None:
    assert paths("package x\nallow if object.get(input, \"a\", 1) == 1") is None
    assert paths("package x\nallow if input[k] == 1") is None
    assert paths("package x\nallow if walk(input, [p, v])") is None
    assert paths("package x\nallow if data.y.allow with input as {}") is None


def test_strings_comments_and_fields_named_like_roots_are_not_references() -> None:
    assert paths('package x\n# input.secret\nallow if { "input.a" == x; request.http == 1 }\nhttp := 1') == {}


def test_lists_are_kept_whole() -> None:
    document = {"parsed_path": ["a", "b"], "attributes": {"x": 1}}
    assert project(document, paths("package x\nallow if input.parsed_path[0] == \"a\"")) == {"parsed_path": ["a", "b"]}


def _token(role: str, sub: str) -> str:
    return jwt.encode({"role": role, "sub": base64.urlsafe_b64encode(sub.encode()).decode().rstrip("="),
                       "nbf": 1_600_000_000, "exp": 4_000_000_000}, "secret", algorithm="HS256")


requests = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "POST", "DELETE"]),
    "path": st.sampled_from(["/people", "/people/bob", "/orders", "/people/x/y", "/"]),
    "role": st.sampled_from(["guest", "admin", "nobody"]),
    "sub": st.sampled_from(["alice", "bob"]),
    "firstname": st.sampled_from(["Alice", "bob", "Carol"]),
    "x_role": st.sampled_from(["guest", "admin", ""]),
    "service": st.sampled_from(["frontend", "orders", "payments", ""]),
    "sensitivity": st.sampled_from(["low", "medium", "high"]),
    "user": st.booleans(),
    "caller": st.sampled_from(["", "spiffe://example.org/frontend", "spiffe://example.org/orders"]),
})


def _documents(case: dict) -> dict:
    body = json.dumps({"firstname": case["firstname"]})
    headers = {"authorization": f"Bearer {_token(case['role'], case['sub'])}", "x-role": case["x_role"],
               "content-type": "application/json", "content-length": str(len(body))}
    request = check_request_from_json({"attributes": {
        "request": {"http": {"method": case["method"], "path": case["path"], "headers": headers, "body": body}},
        "contextExtensions": {"service": case["service"], "sensitivity": case["sensitivity"]}}})
    identity = {"method": "session" if case["user"] else "mtls",
                "user": {"sub": case["sub"]} if case["user"] else None,
                "workload": {"spiffe_id": case["caller"]} if case["caller"] else None,
                "session": {"id_sha256": "x", "bound_to": {"spiffe_id": case["caller"]}} if case["user"] else None,
                "delegation": []}
    return build_input(facts_from_check_request(request), identity, {})


POLICIES = [TUTORIAL_POLICY, REPO / "policies", REPO / "tests" / "bench" / "policies" / "route_rule"]


@pytest.fixture(scope="module")
def evaluators():  # type: ignore[no-untyped-def]
    built = []
    for folder in POLICIES:
        policy_set = load_policy_set(folder)
        built.append((CompiledPolicy.compile(policy_set, "data.envoy.authz.allow").new_evaluator(),
                      input_paths(policy_set.serving_modules)))
    yield built
    for evaluator, _ in built:
        evaluator.close()


def test_the_shipped_policies_are_projected(evaluators) -> None:  # type: ignore[no-untyped-def]
    assert all(tree is not None for _, tree in evaluators)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(case=requests)
def test_projected_and_full_inputs_decide_alike(evaluators, case: dict) -> None:  # type: ignore[no-untyped-def]
    document = _documents(case)
    for evaluator, tree in evaluators:
        assert evaluator.evaluate(encode_input(project(document, tree))) == evaluator.evaluate(encode_input(document))


# -- protomap(message, tree): each named field read directly, as the walk over every populated field gave it

VECTORS = REPO / "tests" / "vectors" / "opa_envoy_input"


def _walk(message, tree):  # type: ignore[no-untyped-def]
    """The reference: every populated field listed and converted, the named ones kept (protomap's
    former walk, kept here as the oracle)."""
    from google.protobuf import json_format

    from authz_server.envoy import protomap
    if message.DESCRIPTOR.full_name == "google.protobuf.Struct":
        return json_format.MessageToDict(message)
    out = {}
    for field, value in message.ListFields():
        sub = tree.get(field.json_name)
        if sub is None:
            continue
        message_type = field.message_type
        is_map = message_type is not None and message_type.GetOptions().map_entry
        if sub is True or field.is_repeated and not is_map or message_type is None:
            out[field.json_name] = protomap(message)[field.json_name]
        elif is_map:
            one = message_type.fields_by_name["value"]
            kept = {key: (_walk(value[key], below) if below is not True else protomap(value[key]))
                    if one.message_type is not None else protomap(message)[field.json_name][key]
                    for key, below in sub.items() if key in value}
            if kept:
                out[field.json_name] = kept
        elif inner := _walk(value, sub):
            out[field.json_name] = inner
    return out


def _trees(document: dict) -> st.SearchStrategy:
    """Trees naming parts of ``document`` (any depth, whole or in part) and keys it does not have."""
    def paths(node, prefix=()):  # type: ignore[no-untyped-def]
        yield prefix
        if isinstance(node, dict):
            for key, value in node.items():
                yield from paths(value, (*prefix, key))
    known = [path for path in paths(document) if path] + [("nothere",), ("request", "http", "nothere"),
                                                          ("source", "address", "socketAddress", "nothere")]

    def tree_of(chosen):  # type: ignore[no-untyped-def]
        tree: dict = {}
        for path in chosen:
            node = tree
            for key in path[:-1]:
                if node.get(key) is True:
                    break
                node = node.setdefault(key, {})
            else:
                node[path[-1]] = True
        return tree
    return st.lists(st.sampled_from(known), min_size=1, max_size=6).map(tree_of)


@pytest.mark.parametrize("vector", sorted(VECTORS.glob("*.json")), ids=lambda p: p.stem)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_projection_reads_what_the_walk_over_every_field_kept(vector, data) -> None:  # type: ignore[no-untyped-def]
    from authz_server.envoy import protomap
    message = check_request_from_json(json.loads(vector.read_text())["request"]).attributes
    tree = data.draw(_trees(protomap(message)))
    projected = protomap(message, tree)
    expected = _walk(message, tree)
    assert projected == expected
    assert json.dumps(projected) == json.dumps(expected)  # the same order: the same encoding, the same cache key
