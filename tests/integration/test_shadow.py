"""A shadow policy beside the live one: disagreements counted by kind, written to the audit log
with both results, summarised by ``shadow report``, and the shadow promoted through the admin API."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server._proto import authz_admin_pb2 as admin_pb
from authz_server._proto import authz_admin_pb2_grpc as admin_grpc
from authz_server.cli import main
from authz_server.config import AdminConfig, TlsConfig, config_from_mapping
from tests.support.authz import running_app, write_policy
from tests.support.pki import ScratchCA

LIVE = """package envoy.authz
import rego.v1

default allow := false

allow if input.attributes.request.http.method in {"GET", "DELETE"}
"""

SHADOW = """package envoy.authz
import rego.v1

default allow := false

allow := {"allowed": true, "headers": {"x-tier": "gold"}} if input.attributes.request.http.method == "GET"

allow if input.attributes.request.http.method == "POST"
"""


def _check(method: str, path: str = "/orders/1") -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method = method
    request.attributes.request.http.path = path
    return request


async def _eventually(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _channel(address: str, ca: ScratchCA, spiffe_id: str) -> grpc.aio.Channel:
    leaf = ca.issue(spiffe_id)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=leaf.key_pem,
                                               certificate_chain=leaf.cert_pem)
    return grpc.aio.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


async def test_the_shadow_policy_is_compared_reported_and_promoted(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    write_policy(tmp_path / "live", LIVE)
    write_policy(tmp_path / "shadow", SHADOW)
    audit = tmp_path / "audit.jsonl"
    ca = ScratchCA.create()
    cert, key, ca_file = ca.write(tmp_path / "tls", "authz", ca.issue("spiffe://example.org/authz-server"))
    config = config_from_mapping({"policies": str(tmp_path / "live"), "addr": "127.0.0.1:0", "metrics_addr": "",
                                  "audit": [f"file:{audit}"],
                                  "shadow": {"policies": str(tmp_path / "shadow"), "sample": 1.0}})
    config = replace(config, tls=TlsConfig(cert_file=str(cert), key_file=str(key), ca_file=str(ca_file),
                                           allowed_clients=("spiffe://example.org/sidecar/*",)),
                     admin=AdminConfig(addr="127.0.0.1:0", allowed=("spiffe://example.org/ops",)))
    async with running_app(config) as app:
        assert app.shadow is not None
        await _eventually(lambda: app.shadow.runtime.active is not None, "the shadow policy")  # type: ignore[union-attr]
        async with _channel(app.bound["addr"], ca, "spiffe://example.org/sidecar/a") as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            codes = {}
            for method in ("GET", "DELETE", "POST", "PUT"):
                codes[method] = (await check(_check(method), timeout=10)).status.code
            # the live policy answered, untouched by the shadow
            assert codes == {"GET": 0, "DELETE": 0, "POST": 7, "PUT": 7}
            await _eventually(lambda: app.shadow.stats.compared == 4, "4 comparisons")  # type: ignore[union-attr]
            assert app.shadow.stats.disagreements == {"allow_to_deny": 1, "deny_to_allow": 1, "status_differs": 0,
                                                      "headers_differ": 1}
            exposition = app.metrics.exposition().decode()
            assert 'authz_shadow_disagreements_total{kind="allow_to_deny"} 1.0' in exposition
            await app.audit.drain()  # type: ignore[union-attr]
            records = [json.loads(line) for line in audit.read_text().splitlines()]
            shadow_records = [r for r in records if r.get("type") == "shadow"]
            assert sorted(r["shadow"]["kind"] for r in shadow_records) == ["allow_to_deny", "deny_to_allow",
                                                                          "headers_differ"]
            deleted = next(r for r in shadow_records if r["shadow"]["kind"] == "allow_to_deny")
            assert deleted["result"] is True and deleted["shadow"]["shadow"]["result"] is False
            assert deleted["shadow_of"] in {r["decision_id"] for r in records if r.get("type") != "shadow"}
            assert deleted["input"]["attributes"]["request"]["http"]["method"] == "DELETE"

            assert main(["shadow", "report", "--audit", f"file:{audit}"]) == 0
            report = capsys.readouterr().out
            assert "shadow disagreements" in report and "allow_to_deny    1" in report and "DELETE /orders/1" in report
            assert "requests compared" in report  # as of the latest disagreement record

            async with _channel(app.bound["admin_addr"], ca, "spiffe://example.org/ops") as admin_channel:
                admin = admin_grpc.AdminStub(admin_channel)
                state = await admin.GetShadow(admin_pb.GetShadowRequest(), timeout=10)
                assert state.configured and state.version and state.version != state.live_version
                with pytest.raises(grpc.aio.AioRpcError) as stale:
                    await admin.PromoteShadow(admin_pb.PromoteShadowRequest(expect_version="0" * 16), timeout=60)
                assert stale.value.code() == grpc.StatusCode.ABORTED
                promoted = await admin.PromoteShadow(admin_pb.PromoteShadowRequest(expect_version=state.version),
                                                     timeout=60)
                assert promoted.policy_version == state.version == app.runtime.active.version  # type: ignore[union-attr]
            assert (await check(_check("DELETE"), timeout=10)).status.code == 7
            assert (await check(_check("POST"), timeout=10)).status.code == 0


async def test_a_shadow_bundle_is_compared_but_never_serves(tmp_path: Path) -> None:
    from authz_server.bundles.archive import write_tarball
    from authz_server.bundles.server import ControlPlaneServer, start_server

    write_policy(tmp_path / "live", LIVE)
    state = ControlPlaneServer()
    runner, addr = await start_server(state)
    state.publish("next", write_tarball([(".manifest", b'{"revision": "next-1"}'),
                                         ("policy.rego", SHADOW.encode())]))
    try:
        config = config_from_mapping({
            "policies": str(tmp_path / "live"), "addr": "127.0.0.1:0", "metrics_addr": "",
            "services": [{"name": "cp", "url": f"http://{addr}"}],
            "bundles": {"next": {"polling": {"min_delay_seconds": 0.2, "max_delay_seconds": 0.4}}},
            "shadow": {"bundle": "next", "sample": 1.0}})
        async with running_app(config) as app:
            assert app.shadow is not None
            await _eventually(lambda: app.shadow.runtime.active is not None, "the shadow bundle")  # type: ignore[union-attr]
            assert app.runtime.active is not None and app.runtime.active.policy_set.root == str(tmp_path / "live")
            async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
                answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(_check("DELETE"), timeout=10)
            assert answer.status.code == 0  # live
            await _eventually(lambda: app.shadow.stats.disagreements["allow_to_deny"] == 1,  # type: ignore[union-attr]
                              "the disagreement")
    finally:
        await runner.cleanup()
