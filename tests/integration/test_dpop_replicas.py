"""A DPoP proof is used once across every replica: two authz-server instances sharing one real
redis-server refuse on the second the proof the first accepted. Tokens from oidc-provider."""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server.config import Config, SessionsConfig
from authz_server.identity.oidc import IssuerConfig
from tests.support.authz import running_app, write_policy
from tests.support.dpop import DpopClient
from tests.support.oidc import ORDERS, needs_oidc_provider, start_provider

pytestmark = [pytest.mark.redis, needs_oidc_provider()]

POLICY = 'package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.identity.user.cnf.jkt != ""\n'
URL = "https://api.test/orders"


def check(token: str, proof: str) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", "/orders", "api.test", "https"
    http.headers.update({"authorization": f"DPoP {token}", "dpop": proof, "x-forwarded-proto": "https"})
    return request


async def test_a_proof_accepted_by_one_replica_is_refused_by_the_other(supervisor, redis_server,
                                                                         tmp_path: Path) -> None:
    provider, client_secrets = start_provider(supervisor, tmp_path / "op")
    write_policy(tmp_path / "policies", POLICY)
    client = DpopClient()
    async with httpx.AsyncClient(timeout=10) as http:
        endpoint = provider.metadata()["token_endpoint"]
        issued = (await http.post(endpoint, auth=("shop", client_secrets["shop"]),
                                  headers={"dpop": client.proof("POST", endpoint)},
                                  data={"grant_type": "client_credentials", "resource": ORDERS})).json()
    token = issued["access_token"]
    config = Config(policies=str(tmp_path / "policies"), metrics_addr="", addr="127.0.0.1:0",
                    sessions=SessionsConfig(store=redis_server.url),
                    issuers=(IssuerConfig.from_mapping({"issuer": provider.issuer, "audiences": ["orders"],
                                                        "dpop": "required"}, "issuers[0]"),))
    async with contextlib.AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(running_app(config)) for _ in range(2)]
        stubs = []
        for app in replicas:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(app.bound["addr"]))
            stubs.append(external_auth_pb2_grpc.AuthorizationStub(channel))
        for first, second in ((0, 1), (1, 0)):
            proof = client.proof("GET", URL, token=token)
            accepted = await stubs[first].Check(check(token, proof))
            assert accepted.status.code == 0, accepted.denied_response.body
            replayed = await stubs[second].Check(check(token, proof))
            assert replayed.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
            assert '"dpop_replay"' in replayed.denied_response.body
