"""Bundles from a real control plane (aiohttp, over loopback) to real ext_authz answers (gRPC).

A bundle change goes live; bad bundles (corrupt, truncated, badly signed, failing their own
tests) never replace a good one; no request is decided by half a set; a restart without the
control plane starts from the persisted bundle; status reports and decision logs arrive."""

from __future__ import annotations

import asyncio
import json
import time

from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server.bundles.archive import write_tarball
from authz_server.bundles.server import ControlPlaneServer, Faults, start_server
from authz_server.bundles.signing import SIGNATURES_FILE, sign_files, signatures_document
from authz_server.config import config_from_mapping
from tests.support.authz import running_app

SECRET = "a secret the bundle service and the servers share"


def policy_bundle(revision: str, *, methods: tuple[str, ...] = ("GET",), tests: str = "",
                  sign_with: str = "", extra: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """A bundle whose policy allows ``methods`` and says its revision in a header, with its
    data carrying the same revision: a half-loaded set would show two different ones."""
    allowed = ", ".join(json.dumps(m) for m in methods)
    files = [
        (".manifest", json.dumps({"revision": revision, "roots": ["envoy/authz", "system"]}).encode()),
        ("envoy/authz/policy.rego", f"""package envoy.authz
import rego.v1

default allow := false

allow := {{"allowed": true, "headers": {{"x-policy-revision": "{revision}",
          "x-data-revision": data.envoy.authz.revision}}}} if {{
    input.attributes.request.http.method in {{{allowed}}}
}}
""".encode()),
        ("envoy/authz/data.json", json.dumps({"revision": revision}).encode()),
        *extra,
    ]
    if tests:
        files.append(("envoy/authz/policy_test.rego", tests.encode()))
    if sign_with:
        token = sign_files(files, key=sign_with, algorithm="HS256", keyid="bundles", claims={"scope": "authz"})
        files.append((SIGNATURES_FILE, signatures_document(token)))
    return write_tarball(files)


def plane_config(url: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "services": [{"name": "cp", "url": url}],
        "bundles": {"authz": {"service": "cp", "persist": True,
                              "polling": {"min_delay_seconds": 0.2, "max_delay_seconds": 0.4}}},
        "persistence_directory": str(tmp_path / "opa"),
        "status": {"service": "cp"},
        "addr": "127.0.0.1:0",
        "metrics_addr": "",
    }
    config.update(extra)
    return config


@pytest.fixture
async def control_plane() -> AsyncIterator[tuple[ControlPlaneServer, str]]:
    state = ControlPlaneServer()
    runner, addr = await start_server(state)
    try:
        yield state, f"http://{addr}"
    finally:
        await runner.cleanup()


def _check(method: str = "GET", path: str = "/orders/1", headers: dict[str, str] | None = None
           ) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method = method
    request.attributes.request.http.path = path
    for name, value in (headers or {}).items():
        request.attributes.request.http.headers[name] = value
    return request


async def eventually(check: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _revisions(answer: external_auth_pb2.CheckResponse) -> tuple[str, str]:
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    return headers.get("x-policy-revision", ""), headers.get("x-data-revision", "")


def _serving(app: Any) -> str:
    return app.runtime.active.policy_set.revision if app.runtime.active is not None else ""


async def test_a_bundle_serves_and_a_new_revision_goes_live(control_plane: Any, tmp_path: Path) -> None:
    state, url = control_plane
    state.publish("authz", policy_bundle("r1"))
    config = config_from_mapping(plane_config(url, tmp_path))
    async with running_app(config) as app:
        await eventually(lambda: _serving(app) == "r1", what="r1 serving")
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            answer = await check(_check("GET"), timeout=10)
            assert answer.status.code == 0 and _revisions(answer) == ("r1", "r1")
            assert (await check(_check("DELETE"), timeout=10)).status.code == 7
            state.publish("authz", policy_bundle("r2", methods=("GET", "DELETE")))
            await eventually(lambda: _serving(app) == "r2", what="r2 serving")
            assert (await check(_check("DELETE"), timeout=10)).status.code == 0
        # the second request of each poll carries the ETag of what serves: 304 while unchanged
        await eventually(lambda: any(h.get("if-none-match") == state.bundle("authz").etag  # type: ignore[union-attr]
                                     for _, _, h in state.requests), what="a conditional request")
        assert app.control is not None and app.control.bundles is not None
        assert app.control.bundles.status["authz"].active_revision == "r2"
        await eventually(lambda: any((r.get("bundles") or {}).get("authz", {}).get("active_revision") == "r2"
                                     for r in state.statuses.values()), what="a status report of r2")
        report = next(iter(state.statuses.values()))
        assert report["plugins"]["bundle"]["state"] == "OK" and report["labels"]["app"] == "authz-server"


@pytest.mark.parametrize("bad", ["corrupt", "truncated", "unsigned", "bad_signature", "failing_tests",
                                 "outside_roots"])
async def test_a_bad_bundle_never_replaces_a_good_one(control_plane: Any, tmp_path: Path, bad: str) -> None:
    state, url = control_plane
    state.publish("authz", policy_bundle("good", sign_with=SECRET))
    raw = plane_config(url, tmp_path, keys={"bundles": {"algorithm": "HS256", "key": SECRET}})
    raw["bundles"]["authz"]["signing"] = {"keyid": "bundles", "scope": "authz"}
    config = config_from_mapping(raw)
    async with running_app(config) as app:
        await eventually(lambda: _serving(app) == "good", what="the good bundle")
        assert app.control is not None and app.control.bundles is not None
        status = app.control.bundles.status["authz"]
        if bad == "truncated":
            state.publish("authz", policy_bundle("bad", sign_with=SECRET))
            state.faults = Faults.parse("truncate")
        elif bad == "corrupt":
            state.publish("authz", policy_bundle("bad", sign_with=SECRET)[:-40] + b"\0" * 40)
        elif bad == "unsigned":
            state.publish("authz", policy_bundle("bad"))
        elif bad == "bad_signature":
            state.publish("authz", policy_bundle("bad", sign_with="not the secret the servers know"))
        elif bad == "failing_tests":
            state.publish("authz", policy_bundle("bad", sign_with=SECRET, tests=(
                "package envoy.authz.tests\nimport rego.v1\nimport data.envoy.authz\n\n"
                'test_get_is_allowed if authz.allow.allowed with input as '
                '{"attributes": {"request": {"http": {"method": "POST"}}}}\n')))
        else:
            state.publish("authz", policy_bundle("bad", sign_with=SECRET,
                                                 extra=(("other/policy.rego", b"package other\n"),)))
        await eventually(lambda: status.code == "bundle_error", what="the bad bundle refused")
        expected = {"corrupt": "bundle_unreadable", "truncated": "service_unavailable", "unsigned": "bundle_unsigned",
                    "bad_signature": "bundle_signature_invalid", "failing_tests": "policy_tests_failed",
                    "outside_roots": "bundle_invalid"}[bad]
        assert status.error_code == expected, status.message
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(_check(), timeout=10)
        assert _revisions(answer) == ("good", "good") and _serving(app) == "good"
        await eventually(lambda: any((r.get("bundles") or {}).get("authz", {}).get("code") == "bundle_error"
                                     for r in state.statuses.values()), what="the error reported")
        # once the control plane publishes a good bundle again, it is taken
        state.faults = Faults()
        state.publish("authz", policy_bundle("fixed", sign_with=SECRET))
        await eventually(lambda: _serving(app) == "fixed" and status.code == "", what="the fixed bundle")


async def test_no_request_is_decided_by_half_a_set(control_plane: Any, tmp_path: Path) -> None:
    state, url = control_plane
    state.publish("authz", policy_bundle("0"))
    raw = plane_config(url, tmp_path)
    raw["bundles"]["authz"]["polling"] = {"min_delay_seconds": 0.05, "max_delay_seconds": 0.1}
    async with running_app(config_from_mapping(raw)) as app:
        await eventually(lambda: _serving(app) == "0", what="the first bundle")
        seen: set[tuple[str, str]] = set()
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check

            async def hammer(stop: asyncio.Event) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    seen.add(_revisions(await check(_check(path=f"/orders/{n}"), timeout=10)))

            stop = asyncio.Event()
            workers = [asyncio.create_task(hammer(stop)) for _ in range(8)]
            for revision in range(1, 5):
                state.publish("authz", policy_bundle(str(revision)))
                await eventually(lambda r=str(revision): _serving(app) == r, what=f"revision {revision}")
            stop.set()
            await asyncio.gather(*workers)
        assert all(policy == data for policy, data in seen), seen  # never one revision's policy with another's data
        assert len(seen) >= 3


async def test_a_restart_without_the_control_plane_starts_from_the_persisted_bundle(
        control_plane: Any, tmp_path: Path) -> None:
    state, url = control_plane
    state.publish("authz", policy_bundle("persisted"))
    config = config_from_mapping(plane_config(url, tmp_path))
    async with running_app(config) as app:
        await eventually(lambda: _serving(app) == "persisted", what="the bundle")
    assert (tmp_path / "opa" / "bundles" / "authz" / "bundle.tar.gz").is_file()
    state.faults = Faults.parse("error:503")  # the control plane is down
    async with running_app(config) as app:
        assert _serving(app) == "persisted"  # before any download: App.start activates the persisted copy
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(_check(), timeout=10)
        assert _revisions(answer) == ("persisted", "persisted")
        assert app.control is not None and app.control.bundles is not None
        await eventually(lambda: app.control.bundles.status["authz"].http_code == 503,  # type: ignore[union-attr]
                         what="the download failure in the status")


async def test_two_bundles_with_disjoint_roots_serve_together(control_plane: Any, tmp_path: Path) -> None:
    state, url = control_plane
    state.publish("authz", write_tarball([
        (".manifest", b'{"revision": "p1", "roots": ["envoy"]}'),
        ("envoy/authz/policy.rego", b"package envoy.authz\nimport rego.v1\ndefault allow := false\n"
                                    b"allow if not input.attributes.request.http.headers[\"x-user\"] in "
                                    b"data.lists.blocked\n")]))
    raw = plane_config(url, tmp_path)
    raw["bundles"]["lists"] = {"service": "cp", "polling": {"min_delay_seconds": 0.2, "max_delay_seconds": 0.4}}
    async with running_app(config_from_mapping(raw)) as app:
        await asyncio.sleep(0.5)
        assert app.runtime.active is None  # the policy alone is not served: it needs its lists
        state.publish("lists", write_tarball([(".manifest", b'{"revision": "l1", "roots": ["lists"]}'),
                                              ("lists/data.json", b'{"blocked": ["mallory"]}')]))
        await eventually(lambda: app.runtime.active is not None, what="both bundles")
        assert app.runtime.active.policy_set.revision == "authz=p1,lists=l1"
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            assert (await check(_check(headers={"x-user": "mallory"}), timeout=10)).status.code == 7
            assert (await check(_check(headers={"x-user": "alice"}), timeout=10)).status.code == 0
            # a lists bundle that reaches into the policy's root is refused; l1 keeps serving
            state.publish("lists", write_tarball([(".manifest", b'{"revision": "l2", "roots": ["lists", "envoy"]}'),
                                                  ("lists/data.json", b'{"blocked": []}')]))
            status = app.control.bundles.status["lists"]  # type: ignore[union-attr]
            await eventually(lambda: status.error_code == "bundle_roots_overlap", what="the overlap refused")
            assert (await check(_check(headers={"x-user": "mallory"}), timeout=10)).status.code == 7


async def test_decision_logs_reach_the_collector_masked_and_dropped_by_rego(control_plane: Any,
                                                                            tmp_path: Path) -> None:
    state, url = control_plane
    log_rules = (("system/log/rules.rego", b'package system.log\nimport rego.v1\n'
                  b'drop if input.input.attributes.request.http.path == "/health"\n'
                  b'mask contains "/input/attributes/request/http/headers/x-card"\n'),)
    state.publish("authz", policy_bundle("r1", extra=log_rules))
    raw = plane_config(url, tmp_path, decision_logs={
        "service": "cp", "reporting": {"min_delay_seconds": 0.1, "max_delay_seconds": 0.2}})
    async with running_app(config_from_mapping(raw)) as app:
        await eventually(lambda: _serving(app) == "r1", what="r1")
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            state.faults = Faults.parse("error:500@/logs")  # the collector is down for a while
            for n in range(20):
                await check(_check(path=f"/orders/{n}", headers={"x-card": "4111111111111111"}), timeout=10)
            await check(_check(path="/health"), timeout=10)
            sink = app.control.decision_log_status  # type: ignore[union-attr]
            await eventually(lambda: sink is not None and "500" in sink.message, what="the upload failure seen")
            await eventually(lambda: any((r.get("decision_logs") or {}).get("http_code") == "500"
                                         for r in state.statuses.values()), what="the upload failure reported")
            assert not state.events
            state.faults = Faults()
            await eventually(lambda: len(state.events) == 20, what="the 20 events after the collector is back")
    event = state.events[0]
    assert event["path"] == "envoy/authz/allow" and event["bundles"]
    assert "x-card" not in json.dumps(event["input"]) and "/input/attributes/request/http/headers/x-card" in \
        event["erased"]
    assert all(e["input"]["attributes"]["request"]["http"]["path"] != "/health" for e in state.events)
    assert {e["labels"]["id"] for e in state.events} == {r["labels"]["id"] for r in state.statuses.values()}


async def test_bearer_token_from_a_file_is_sent_and_reread(control_plane: Any, tmp_path: Path) -> None:
    state, url = control_plane
    state.token = "first-token"
    state.publish("authz", policy_bundle("r1"))
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    raw = plane_config(url, tmp_path)
    raw["services"][0]["credentials"] = {"bearer": {"token_path": str(token_file)}}
    async with running_app(config_from_mapping(raw)) as app:
        await eventually(lambda: _serving(app) == "r1", what="r1 with the token")
        token_file.write_text("second-token\n")
        state.token = "second-token"
        state.publish("authz", policy_bundle("r2"))
        await eventually(lambda: _serving(app) == "r2", what="r2 with the rotated token")
    assert any(h.get("authorization") == "Bearer second-token" for _, _, h in state.requests)


def test_policies_and_live_bundles_may_not_both_be_set(tmp_path: Path) -> None:
    from authz_server.errors import ConfigError

    with pytest.raises(ConfigError, match="may not both be set"):
        config_from_mapping({**plane_config("http://127.0.0.1:1", tmp_path), "policies": str(tmp_path)})


