"""Real Envoy in front of a real upstream, asking authz-server over ext_authz gRPC."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest

from authz_server.config import Config
from authz_server.mesh.envoy import start_envoy
from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy
from authz_server.mesh.upstream import serve_echo
from tests.support.rawhttp import raw_request
from tests.support.authz import TUTORIAL_POLICY, copy_policies, running_app, write_policy

pytestmark = pytest.mark.e2e

HEADERS_POLICY = """
package envoy.authz
import rego.v1

default allow := false

allow := {"allowed": true, "headers": {"x-policy-said": "yes", "x-user": object.get(input.attributes.request.http.headers, "x-user", "nobody")},
          "response_headers_to_add": {"x-seen-by": "authz"}} if {
    input.attributes.request.http.method == "GET"
    input.parsed_path[0] == "public"
}

allow := {"allowed": false, "http_status": 429, "body": "no tea for you", "headers": {"x-reason": "teapot"}} if {
    input.parsed_path[0] == "teapot"
}
"""


def tutorial_token(role: str, sub: str = "alice", *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    claims = {"role": role, "sub": base64.urlsafe_b64encode(sub.encode()).decode().rstrip("="),
              "nbf": int(now) - 60, "exp": int(now) + 600}
    return jwt.encode(claims, "secret", algorithm="HS256")


async def _mesh(supervisor, tmp_path: Path, policy_dir: Path, *, with_body: bool = False):  # type: ignore[no-untyped-def]
    upstream, upstream_addr = await serve_echo("127.0.0.1:0", "people")
    app_cm = running_app(Config(policies=str(policy_dir), addr="127.0.0.1:0", metrics_addr=""))
    app = await app_cm.__aenter__()
    envoy = start_envoy(supervisor, "front", render_front_proxy(FrontProxy(
        upstream=upstream_addr, authz=AuthzTarget(app.bound["addr"], with_request_body=with_body),
        routes=(Route("/"),))))
    return upstream, app_cm, app, envoy


async def test_tutorial_policy_runs_unchanged_behind_envoy(supervisor, tmp_path: Path) -> None:
    policy_dir = copy_policies(TUTORIAL_POLICY, tmp_path / "policies")
    upstream, app_cm, app, envoy = await _mesh(supervisor, tmp_path, policy_dir, with_body=True)
    base = f"http://127.0.0.1:{envoy.port('ingress')}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            guest = {"authorization": f"Bearer {tutorial_token('guest')}"}
            admin = {"authorization": f"Bearer {tutorial_token('admin', 'alice')}"}
            ok = await client.get("/people/bob", headers=guest)
            assert ok.status_code == 200
            echoed = ok.json()
            assert echoed["service"] == "people"
            assert uuid.UUID(echoed["headers"]["x-authz-decision-id"]).version == 4  # injected upstream by the OK response

            denied = await client.post("/people", headers=guest, json={"firstname": "Charlie"})
            assert denied.status_code == 403
            assert denied.content == b""  # as OPA-Envoy answers a deny the policy gave no body
            assert denied.headers["x-authz-decision-id"]

            # Body-based rule: admins may create people, but not themselves (sub == alice).
            created = await client.post("/people", headers=admin, json={"firstname": "Charlie"})
            assert created.status_code == 200, created.text
            assert json.loads(created.json()["body"]) == {"firstname": "Charlie"}
            itself = await client.post("/people", headers=admin, json={"firstname": "Alice"})
            assert itself.status_code == 403

            expired = {"authorization": f"Bearer {tutorial_token('admin', now=time.time() - 3600)}"}
            assert (await client.get("/people/bob", headers=expired)).status_code == 403
            assert (await client.get("/people/bob")).status_code == 403
    finally:
        await app_cm.__aexit__(None, None, None)
        upstream.close()


async def test_policy_object_result_status_body_and_headers(supervisor, tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    write_policy(policy_dir, HEADERS_POLICY)
    upstream, app_cm, app, envoy = await _mesh(supervisor, tmp_path, policy_dir)
    base = f"http://127.0.0.1:{envoy.port('ingress')}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            ok = await client.get("/public/page", headers={"x-user": "dana", "x-authz-subject": "spoofed-admin"})
            assert ok.status_code == 200
            upstream_saw = ok.json()["headers"]
            assert upstream_saw["x-policy-said"] == "yes"
            assert upstream_saw["x-user"] == "dana"
            assert "x-authz-subject" not in upstream_saw  # a client cannot smuggle identity headers
            assert ok.headers["x-seen-by"] == "authz"

            tea = await client.get("/teapot")
            assert tea.status_code == 429
            assert tea.text == "no tea for you"
            assert tea.headers["x-reason"] == "teapot"

            # Path tricks reach the policy normalised, as Envoy routes them.
            port = envoy.port("ingress")
            assert (await raw_request(port, "/x/../public/page"))[0] == 200
            assert (await raw_request(port, "//public//page"))[0] == 200
            assert (await raw_request(port, "/public/../teapot"))[0] == 429
    finally:
        await app_cm.__aexit__(None, None, None)
        upstream.close()


async def test_hot_swap_while_envoy_runs_and_authz_down_denies(supervisor, tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    write_policy(policy_dir, 'package envoy.authz\nimport rego.v1\ndefault allow := false\n'
                             'allow if input.parsed_path[0] == "a"\n')
    upstream, app_cm, app, envoy = await _mesh(supervisor, tmp_path, policy_dir)
    base = f"http://127.0.0.1:{envoy.port('ingress')}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            assert (await client.get("/a")).status_code == 200
            assert (await client.get("/b")).status_code == 403
            first = app.runtime.active.version

            write_policy(policy_dir, 'package envoy.authz\nimport rego.v1\ndefault allow := false\n'
                                     'allow if input.parsed_path[0] == "b"\n')
            started = time.monotonic()
            while app.runtime.active.version == first:
                assert time.monotonic() - started < 15, "policy change not picked up"
                await _tick()
            assert (await client.get("/b")).status_code == 200
            assert (await client.get("/a")).status_code == 403

            # A broken policy is rejected: the last good one keeps answering.
            write_policy(policy_dir, "package envoy.authz\nallow if {\n")
            while app.runtime.status.current:
                await _tick()
            assert app.runtime.status.last_error_code == "policy_compile_error"
            assert (await client.get("/b")).status_code == 200

            await app_cm.__aexit__(None, None, None)
            down = await client.get("/b")
            assert down.status_code == 403  # failure_mode_allow is false in our configs
    finally:
        await app_cm.__aexit__(None, None, None)
        upstream.close()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.05)
