"""mTLS on the ext_authz port (allowed sidecars only) and the admin API over mTLS."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Mapping

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server._proto import authz_admin_pb2 as admin_pb
from authz_server._proto import authz_admin_pb2_grpc as admin_grpc
from authz_server.config import AdminConfig, Config, TlsConfig
from tests.support.authz import running_app, write_policy
from tests.support.pki import ScratchCA

# Allows a request that carries a user session.
POLICY = """
package envoy.authz
import rego.v1
default allow := false
allow if input.identity.user.sub == "dana"
"""


def _channel(address: str, ca: ScratchCA, spiffe_id: str | None) -> grpc.aio.Channel:
    if spiffe_id is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)
    else:
        leaf = ca.issue(spiffe_id)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=leaf.key_pem,
                                                   certificate_chain=leaf.cert_pem)
    return grpc.aio.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


Stubs = tuple[admin_grpc.AdminStub, external_auth_pb2_grpc.AuthorizationStub]


@contextlib.asynccontextmanager
async def operator_and_sidecar(bound: Mapping[str, str], ca: ScratchCA) -> AsyncIterator[Stubs]:
    """The admin API as the allowed operator, and the check API as a sidecar, over mTLS."""
    async with _channel(bound["admin_addr"], ca, "spiffe://example.org/ops") as admin_channel, \
            _channel(bound["addr"], ca, "spiffe://example.org/sidecar/a") as check_channel:
        yield admin_grpc.AdminStub(admin_channel), external_auth_pb2_grpc.AuthorizationStub(check_channel)


def _check(session_id: str | None = None) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method = "GET"
    request.attributes.request.http.path = "/x"
    if session_id:
        request.attributes.request.http.headers["x-session-id"] = session_id
    return request


@pytest.fixture
def pki(tmp_path: Path):  # type: ignore[no-untyped-def]
    ca = ScratchCA.create()
    cert, key, ca_file = ca.write(tmp_path / "tls", "authz", ca.issue("spiffe://example.org/authz-server"))
    tls = TlsConfig(cert_file=str(cert), key_file=str(key), ca_file=str(ca_file),
                    allowed_clients=("spiffe://example.org/sidecar/*",))
    return ca, tls


async def test_ext_authz_port_admits_only_listed_sidecars(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    ca, tls = pki
    write_policy(tmp_path / "policies", POLICY)
    config = Config(policies=str(tmp_path / "policies"), metrics_addr="", tls=tls)
    async with running_app(config) as app:
        address = app.bound["addr"]
        async with _channel(address, ca, "spiffe://example.org/sidecar/orders") as channel:
            answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(_check())
            assert answer.denied_response.status.code == 403  # admitted: the policy decided (no user)
            assert answer.status.message == "policy_denied"
        async with _channel(address, ca, "spiffe://example.org/not-a-sidecar") as channel:
            answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(_check())
            assert answer.status.message == "ext_authz_client_not_allowed"
        async with _channel(address, ca, None) as channel:  # no client certificate: no TLS session at all
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await external_auth_pb2_grpc.AuthorizationStub(channel).Check(_check(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_admin_api_sessions_lifecycle_for_allowed_operators(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    ca, tls = pki
    write_policy(tmp_path / "policies", POLICY)
    config = Config(policies=str(tmp_path / "policies"), metrics_addr="", tls=replace(tls, allowed_clients=()),
                    admin=AdminConfig(addr="127.0.0.1:0", allowed=("spiffe://example.org/ops",)))
    async with running_app(config) as app:
        async with operator_and_sidecar(app.bound, ca) as (admin, check):
            created = await admin.CreateSession(admin_pb.CreateSessionRequest(
                subject="dana", claims_json='{"roles": ["buyer"]}', ttl_seconds=600))
            assert len(created.id) == 43 and created.session.subject == "dana"
            assert (await check.Check(_check(created.id))).status.code == 0  # the session works at once

            found = await admin.GetSession(admin_pb.SessionRef(id_sha256=created.session.id_sha256))
            assert found.subject == "dana"
            listed = await admin.ListSessions(admin_pb.ListSessionsRequest(subject="dana"))
            assert [s.id_sha256 for s in listed.sessions] == [created.session.id_sha256]

            assert (await admin.RevokeSession(admin_pb.SessionRef(id=created.id))).revoked
            revoked = await check.Check(_check(created.id))
            assert revoked.status.message == "session_revoked"

            second = await admin.CreateSession(admin_pb.CreateSessionRequest(subject="dana"))
            third = await admin.CreateSession(admin_pb.CreateSessionRequest(subject="dana"))
            await admin.RevokeSubject(admin_pb.RevokeSubjectRequest(subject="dana"))
            for session in (second, third):
                assert (await check.Check(_check(session.id))).status.message == "session_revoked"

        async with _channel(app.bound["admin_addr"], ca, "spiffe://example.org/intruder") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin_grpc.AdminStub(channel).ListSessions(admin_pb.ListSessionsRequest())
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


DATA_POLICY = """
package envoy.authz
import rego.v1
default allow := false
allow if not input.parsed_path[0] in data.blocked.paths
"""

DATA_TESTS = """
query: data.envoy.authz.allow
cases:
  - name: the health page is never blocked
    input: {parsed_path: [health]}
    expect: true
"""


async def test_live_policy_data_through_the_admin_api(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    ca, tls = pki
    folder = tmp_path / "policies"
    write_policy(folder, DATA_POLICY)
    (folder / "data.json").write_text('{"blocked": {"paths": ["admin"]}}')
    (folder / "policy_test.yaml").write_text(DATA_TESTS)
    config = Config(policies=str(folder), metrics_addr="", tls=replace(tls, allowed_clients=()),
                    admin=AdminConfig(addr="127.0.0.1:0", allowed=("spiffe://example.org/ops",)))
    async with running_app(config) as app:
        async with operator_and_sidecar(app.bound, ca) as (admin, check):

            def path(p: str) -> external_auth_pb2.CheckRequest:
                request = _check()
                request.attributes.request.http.path = p
                return request

            assert (await check.Check(path("/reports"))).status.code == 0
            assert (await check.Check(path("/reports"))).status.code == 0  # now cached
            before = app.runtime.active.version
            invalidations = app.pipeline.cache.stats.invalidations
            answer = await admin.SetPolicyData(admin_pb.SetPolicyDataRequest(
                path="blocked/paths", value_json='["admin", "reports"]'))
            assert answer.policy_version != before
            assert (await check.Check(path("/reports"))).status.message == "policy_denied"  # cache dropped
            assert app.pipeline.cache.stats.invalidations == invalidations + 1
            got = await admin.GetPolicyData(admin_pb.GetPolicyDataRequest(path="blocked"))
            assert json.loads(got.value_json) == {"paths": ["admin", "reports"]}

            # Data that makes the policy's own tests fail is refused; the last good set keeps serving.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.SetPolicyData(admin_pb.SetPolicyDataRequest(path="blocked/paths", value_json='["health"]'))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "policy test" in refused.value.details()
            assert app.runtime.active.version == answer.policy_version
            assert (await check.Check(path("/health"))).status.code == 0

            await admin.SetPolicyData(admin_pb.SetPolicyDataRequest(path="blocked/paths"))  # remove the override
            assert app.runtime.active.version == before
            assert (await check.Check(path("/reports"))).status.code == 0
