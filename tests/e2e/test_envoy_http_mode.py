"""Envoy's HTTP ext_authz protocol against authz-server, and equality with the gRPC mode."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from authz_server.config import Config
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, render_front_proxy
from authz_server.mesh.upstream import serve_echo
from tests.support.authz import running_app, write_policy
from tests.support.rawhttp import raw_request

pytestmark = pytest.mark.e2e

# Reads method, path, query, headers and the JSON body: every part both modes must carry.
POLICY = """
package envoy.authz
import rego.v1

default allow := false

allow if {
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] == "public"
}

allow if {
    input.attributes.request.http.method == "POST"
    input.parsed_path == ["orders"]
    input.parsed_body.quantity <= 10
    input.attributes.request.http.headers["x-team"] == "blue"
}

allow := {"allowed": false, "http_status": 401, "body": "who are you?", "headers": {"x-hint": "sign in"}} if {
    input.parsed_path[0] == "private"
    not input.attributes.request.http.headers.authorization
}

allow if {
    input.parsed_query.debug == ["1"]
    input.attributes.request.http.headers["x-team"] == "red"
}
"""

CASES = [
    ("GET", "/public/a", {}, None),
    ("GET", "/public/a?x=1", {"x-team": "blue"}, None),
    ("DELETE", "/public/a", {}, None),
    ("POST", "/orders", {"x-team": "blue"}, {"quantity": 3}),
    ("POST", "/orders", {"x-team": "blue"}, {"quantity": 30}),
    ("POST", "/orders", {"x-team": "red"}, {"quantity": 3}),
    ("POST", "/orders", {"x-team": "blue", "content-type": "application/json"}, "not json"),
    ("GET", "/private/x", {}, None),
    ("GET", "/private/x", {"authorization": "Bearer abc"}, None),
    ("GET", "/anything?debug=1", {"x-team": "red"}, None),
    ("GET", "/anything?debug=2", {"x-team": "red"}, None),
    ("GET", "/public/%7Ea", {}, None),
]


async def _statuses(port: int) -> list[tuple[int, str]]:
    out = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        for method, path, headers, body in CASES:
            if isinstance(body, str):
                response = await client.request(method, path, headers=headers, content=body)
            else:
                response = await client.request(method, path, headers=headers, json=body)
            text = response.text
            try:
                parsed = json.loads(text)
                if isinstance(parsed, dict) and "decision_id" in parsed:
                    parsed.pop("decision_id")
                    text = json.dumps(parsed, sort_keys=True)
                elif isinstance(parsed, dict) and "service" in parsed:
                    text = "upstream"
            except ValueError:
                pass
            out.append((response.status_code, text))
    return out


async def test_same_policy_same_decisions_in_grpc_and_http_modes(supervisor, tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    write_policy(policy_dir, POLICY)
    upstream, upstream_addr = await serve_echo("127.0.0.1:0")
    config = Config(policies=str(policy_dir), addr="127.0.0.1:0", http_addr="127.0.0.1:0", metrics_addr="")
    try:
        async with running_app(config) as app:
            ports = {}
            for mode in ("grpc", "http"):
                address = app.bound["addr" if mode == "grpc" else "http_addr"]
                envoy = start_envoy(supervisor, f"front-{mode}", render_front_proxy(FrontProxy(
                    upstream=upstream_addr, authz=AuthzTarget(address, mode=mode, with_request_body=True))))
                ports[mode] = envoy.port("ingress")
            grpc_answers = await _statuses(ports["grpc"])
            http_answers = await _statuses(ports["http"])
            # Run twice: the second round is answered from the caches, and must not differ.
            assert await _statuses(ports["http"]) == http_answers
            assert await _statuses(ports["grpc"]) == grpc_answers
    finally:
        upstream.close()
    assert [status for status, _ in grpc_answers] == [200, 200, 403, 200, 403, 403, 400, 401, 403, 200, 403, 200]
    mismatches = [(case, g, h) for case, g, h in zip(CASES, grpc_answers, http_answers) if g != h]
    assert not mismatches, mismatches


async def test_http_mode_headers_identity_and_fast_path(supervisor, tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    write_policy(policy_dir, POLICY)
    upstream, upstream_addr = await serve_echo("127.0.0.1:0")
    config = Config(policies=str(policy_dir), addr="", http_addr="127.0.0.1:0", metrics_addr="")
    try:
        async with running_app(config) as app:
            envoy = start_envoy(supervisor, "front", render_front_proxy(FrontProxy(
                upstream=upstream_addr, authz=AuthzTarget(app.bound["http_addr"], mode="http"))))
            port = envoy.port("ingress")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                ids = set()
                for _ in range(5):
                    ok = await client.get("/public/a", headers={"x-authz-subject": "spoofed", "x-team": "blue"})
                    assert ok.status_code == 200
                    seen = ok.json()["headers"]
                    assert "x-authz-subject" not in seen  # removed: the client cannot claim an identity
                    ids.add(seen["x-authz-decision-id"])
                assert len(ids) == 5  # every answer has its own decision id, also from the fast path
                assert app.pipeline.cache.stats.hits >= 3

                denied = await client.get("/private/x")
                assert denied.status_code == 401
                assert denied.text == "who are you?"
                assert denied.headers["x-hint"] == "sign in"
                assert denied.headers["x-authz-decision-id"]

            # Path tricks are normalised by Envoy before the check, as in gRPC mode.
            assert (await raw_request(port, "/x/../public/a"))[0] == 200
            assert (await raw_request(port, "//public//a"))[0] == 200
    finally:
        upstream.close()
