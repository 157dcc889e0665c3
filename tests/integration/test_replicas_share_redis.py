"""Two authz-server processes share sessions through a real redis-server."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server._proto import authz_admin_pb2 as admin_pb
from authz_server._proto import authz_admin_pb2_grpc as admin_grpc
from authz_server.devidp.config import DevIdPConfig
from authz_server.devidp.provider import DevIdP
from authz_server.mesh.processes import Supervisor
from tests.support.authz import write_policy
from tests.support.pki import ScratchCA

pytestmark = pytest.mark.redis

POLICY = 'package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.identity.user.sub == "alice"\n'
IDP = {"users": [{"username": "alice", "password": "pw", "subject": "alice"}],
       "clients": [{"client_id": "shop", "client_secret": "s", "grants": ["password"], "audiences": ["orders"]}]}


def start_replica(supervisor: Supervisor, name: str, config: dict, folder: Path) -> dict:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    ready = folder / f"{name}.ready"
    supervisor.start(name, [sys.executable, "-m", "authz_server.cli", "serve", "--config", str(path),
                            "--workers", "1", "--ready-file", str(ready)], ready=ready.exists, timeout=60)
    return json.loads(ready.read_text())


def check(session: str | None = None, token: str | None = None) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/orders"
    if session:
        http.headers["x-session-id"] = session
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    return request


def mtls(address: str, ca: ScratchCA, spiffe_id: str) -> grpc.aio.Channel:
    leaf = ca.issue(spiffe_id)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=leaf.key_pem,
                                               certificate_chain=leaf.cert_pem)
    return grpc.aio.secure_channel(address, credentials)


async def test_two_processes_one_redis(supervisor: Supervisor, redis_server, tmp_path: Path) -> None:
    write_policy(tmp_path / "policies", POLICY)
    ca = ScratchCA.create()
    cert, key, ca_file = ca.write(tmp_path / "tls", "authz", ca.issue("spiffe://example.org/authz-server"))
    async with DevIdP(DevIdPConfig.from_mapping({**IDP, "addr": "127.0.0.1:0"})) as idp:
        config = {
            "addr": "127.0.0.1:0", "metrics_addr": "", "policies": str(tmp_path / "policies"),
            "issuers": [{"issuer": idp.issuer, "audiences": ["orders"]}],
            "sessions": {"store": redis_server.url, "near_cache_ttl": "30s"},
            "tls": {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca_file)},
            "admin": {"addr": "127.0.0.1:0", "allowed": ["spiffe://example.org/ops"]},
        }
        one = start_replica(supervisor, "one", config, tmp_path)
        two = start_replica(supervisor, "two", config, tmp_path)
        sidecar = "spiffe://example.org/sidecar"
        async with mtls(one["addr"], ca, sidecar) as ch1, mtls(two["addr"], ca, sidecar) as ch2, \
                mtls(one["admin_addr"], ca, "spiffe://example.org/ops") as admin_channel:
            ask_one = external_auth_pb2_grpc.AuthorizationStub(ch1).Check
            ask_two = external_auth_pb2_grpc.AuthorizationStub(ch2).Check
            admin = admin_grpc.AdminStub(admin_channel)

            first = await ask_one(check(token=idp.issue("shop", username="alice").access_token))
            assert first.status.code == 0, first
            session = {h.header.key: h.header.value for h in first.ok_response.response_headers_to_add}["x-session-id"]
            assert (await ask_two(check(session=session))).status.code == 0  # made on one, resolved on two

            await admin.RevokeSession(admin_pb.SessionRef(id=session))  # on one
            started = time.monotonic()
            while (await ask_two(check(session=session))).status.code == 0:
                # Pushed by pub/sub, not waited out: the near-cache keeps entries 5 s, so 2 s tells the two
                # apart with room for a busy machine (how fast it really is: make bench).
                assert time.monotonic() - started < 2.0, "revocation on one not enforced on two by pub/sub"

            # Redis goes away: sessions two holds in its near-cache keep working, new ones fail closed.
            second = await ask_one(check(token=idp.issue("shop", username="alice").access_token))
            kept = {h.header.key: h.header.value for h in second.ok_response.response_headers_to_add}["x-session-id"]
            assert (await ask_two(check(session=kept))).status.code == 0
            redis_server.stop()
            assert (await ask_two(check(session=kept))).status.code == 0
            down = await ask_one(check(token=idp.issue("shop", username="alice").access_token))
            assert down.denied_response.status.code == 503
            assert json.loads(down.denied_response.body)["error"] == "session_store_unavailable"

            redis_server.start()
            deadline = time.monotonic() + 15
            while True:
                back = await ask_one(check(token=idp.issue("shop", username="alice").access_token))
                if back.status.code == 0:
                    break
                assert time.monotonic() < deadline, "did not recover after Redis came back"
            fresh = {h.header.key: h.header.value for h in back.ok_response.response_headers_to_add}["x-session-id"]
            assert (await ask_two(check(session=fresh))).status.code == 0


