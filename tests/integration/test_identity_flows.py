"""Identity end to end over real gRPC: the dev OIDC provider issues, authz-server validates once
and hands out sessions; replay, stolen sessions, delegation and token exchange."""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import AsyncIterator

import grpc
import httpx
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server.config import Config, SessionsConfig, TlsConfig
from authz_server.devidp.config import DevIdPConfig
from authz_server.devidp.provider import DevIdP
from authz_server.envoy import facts_from_check_request
from authz_server.identity.exchange import ExchangeConfig, ExchangeRule
from authz_server.identity.oidc import IssuerConfig
from authz_server.identity.resolver import SessionSettings
from authz_server.identity.sessions import session_key
from authz_server.server import App
from tests.support.authz import running_app, write_policy
from tests.support.pki import ScratchCA

POLICY = """
package envoy.authz
import rego.v1

default allow := false

# A user may read; only a listed workload acting for a user may write.
allow if {
    input.identity.user.sub != ""
    input.attributes.request.http.method == "GET"
}

allow if {
    input.attributes.request.http.method == "POST"
    count(input.identity.delegation) > 0
    input.identity.delegation[count(input.identity.delegation) - 1].actor == "spiffe://example.org/frontend"
}

# Payments: only tokens exchanged by orders for the payments audience.
allow if {
    input.attributes.contextExtensions.service == "payments"
    input.identity.user.claims.aud == "payments"
    input.identity.workload.spiffe_id == "spiffe://example.org/orders"
}
"""

IDP = {
    "users": [{"username": "alice", "password": "wonderland", "subject": "alice", "claims": {"roles": ["buyer"]}}],
    "clients": [{"client_id": "shop", "client_secret": "s3cret", "grants": ["password", "client_credentials"],
                 "audiences": ["orders"], "scopes": ["orders.read", "orders.write"]}],
}


@contextlib.asynccontextmanager
async def identity_stack(tmp_path: Path, *, exchange: bool = False) -> AsyncIterator[tuple[App, DevIdP, ScratchCA]]:
    write_policy(tmp_path / "policies", POLICY)
    ca = ScratchCA.create()
    cert, key, ca_file = ca.write(tmp_path / "tls", "authz", ca.issue("spiffe://example.org/authz-server"))
    idp = DevIdP(DevIdPConfig.from_mapping(IDP))
    issuer = await idp.start("127.0.0.1:0")
    sessions = SessionsConfig(settings=SessionSettings(delegation_actors=("spiffe://example.org/frontend",),
                                                       idle_timeout=600, max_lifetime=3600))
    config = Config(
        policies=str(tmp_path / "policies"), metrics_addr="", trust_domains=("example.org",), sessions=sessions,
        issuers=(IssuerConfig.from_mapping({"issuer": issuer, "audiences": ["orders"]}, "issuers[0]"),),
    )
    if exchange:
        config = Config(**{**config.__dict__,
                           "tls": TlsConfig(cert_file=str(cert), key_file=str(key), ca_file=str(ca_file)),
                           "exchange": ExchangeConfig(addr="127.0.0.1:0", issuer="https://authz.test/exchange",
                                                      rules=(ExchangeRule("spiffe://example.org/orders",
                                                                          ("payments",), ("orders.read",)),))})
    try:
        async with running_app(config) as app:
            yield app, idp, ca
    finally:
        await idp.stop()


def request(method: str = "GET", *, token: str | None = None, session: str | None = None,
            principal: str = "", certificate: str = "", service: str = "orders",
            user_agent: str = "client/1") -> external_auth_pb2.CheckRequest:
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host = method, "/orders", "orders"
    http.headers["user-agent"] = user_agent
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    if session:
        http.headers["x-session-id"] = session
    check.attributes.source.address.socket_address.address = "10.0.0.9"
    if principal:
        check.attributes.source.principal = principal
    if certificate:
        check.attributes.source.certificate = urllib.parse.quote(certificate)
    check.attributes.context_extensions["service"] = service
    return check


async def ask(app: App, check: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
    async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
        return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check)


def headers_of(options) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {o.header.key: o.header.value for o in options}


async def test_jwt_validated_once_then_the_session_id_alone(tmp_path: Path) -> None:
    async with identity_stack(tmp_path) as (app, idp, _):
        token = idp.issue("shop", username="alice").access_token
        first = await ask(app, request(token=token))
        assert first.status.code == 0, first
        client_headers = headers_of(first.ok_response.response_headers_to_add)
        session_id = client_headers["x-session-id"]
        assert len(session_id) == 43 and token not in session_id
        upstream = headers_of(first.ok_response.headers)
        assert upstream["x-authz-subject"] == "alice"
        assert "authorization" in first.ok_response.headers_to_remove  # the service never sees the token
        validated = app.identity.stats.tokens_validated

        for _ in range(5):
            again = await ask(app, request(session=session_id))
            assert again.status.code == 0
            assert headers_of(again.ok_response.headers)["x-authz-subject"] == "alice"
        assert app.identity.stats.tokens_validated == validated  # no crypto after the first call

        assert await app.identity.store.revoke(session_key(session_id), now=time.time())
        revoked = await ask(app, request(session=session_id))
        assert revoked.status.code == 16 and revoked.denied_response.status.code == 401
        assert json.loads(revoked.denied_response.body)["error"] == "session_revoked"


async def test_replayed_token_from_another_client_is_refused_and_reported(tmp_path: Path) -> None:
    async with identity_stack(tmp_path) as (app, idp, ca):
        token = idp.issue("shop", username="alice").access_token
        frontend = ca.issue("spiffe://example.org/frontend").cert_pem.decode()
        ok = await ask(app, request(token=token, principal="spiffe://example.org/frontend", certificate=frontend))
        assert ok.status.code == 0
        thief = ca.issue("spiffe://example.org/payments").cert_pem.decode()
        replay = await ask(app, request(token=token, principal="spiffe://example.org/payments", certificate=thief))
        assert replay.denied_response.status.code == 401
        body = json.loads(replay.denied_response.body)
        assert body["error"] == "token_replay"
        assert "spiffe://example.org/frontend" in body["message"] and "spiffe://example.org/payments" in body["message"]
        assert app.identity.stats.replays == 1


async def test_session_is_bound_delegation_is_policy_and_theft_is_refused(tmp_path: Path) -> None:
    async with identity_stack(tmp_path) as (app, idp, ca):
        token = idp.issue("shop", username="alice").access_token
        first = await ask(app, request(token=token, user_agent="browser/1"))
        session_id = headers_of(first.ok_response.response_headers_to_add)["x-session-id"]

        # frontend (an allowed actor) forwards alice's session: delegation, and the policy lets it write.
        frontend = ca.issue("spiffe://example.org/frontend").cert_pem.decode()
        delegated = await ask(app, request("POST", session=session_id, principal="spiffe://example.org/frontend",
                                           certificate=frontend))
        assert delegated.status.code == 0, delegated
        # alice herself may not write (no delegation): the policy decides on input.identity.delegation.
        own = await ask(app, request("POST", session=session_id, user_agent="browser/1"))
        assert own.denied_response.status.code == 403

        # Another workload that is not an allowed actor presents the session: stolen.
        stranger = ca.issue("spiffe://example.org/payments").cert_pem.decode()
        stolen = await ask(app, request(session=session_id, principal="spiffe://example.org/payments",
                                        certificate=stranger))
        assert json.loads(stolen.denied_response.body)["error"] == "session_bound_elsewhere"
        assert app.identity.stats.stolen_sessions == 1

        # A workload from a trust domain we do not trust is refused before anything else.
        foreign = await ask(app, request(session=session_id, principal="spiffe://evil.org/frontend"))
        assert json.loads(foreign.denied_response.body)["error"] == "untrusted_trust_domain"


async def test_token_exchange_for_a_narrow_bound_token_on_behalf_of_the_user(tmp_path: Path) -> None:
    async with identity_stack(tmp_path, exchange=True) as (app, idp, ca):
        alice = idp.issue("shop", username="alice", scope="orders.read orders.write").access_token
        orders = ca.issue("spiffe://example.org/orders")
        frontend = ca.issue("spiffe://example.org/frontend")
        tls_dir = tmp_path / "client"
        tls_dir.mkdir()
        for name, leaf in (("orders", orders), ("frontend", frontend)):
            (tls_dir / f"{name}.pem").write_bytes(leaf.cert_pem)
            (tls_dir / f"{name}.key").write_bytes(leaf.key_pem)
        (tls_dir / "ca.pem").write_bytes(ca.pem)
        url = f"https://{app.bound['exchange_addr']}/token"
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": alice,
                "subject_token_type": "urn:ietf:params:oauth:token-type:access_token", "audience": "payments"}

        async def post(name: str, data: dict[str, str]) -> httpx.Response:
            context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
            context.load_cert_chain(tls_dir / f"{name}.pem", tls_dir / f"{name}.key")
            async with httpx.AsyncClient(verify=context) as client:
                return await client.post(url, data=data)

        granted = await post("orders", form)
        assert granted.status_code == 200, granted.text
        answer = granted.json()
        assert answer["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
        assert answer["scope"] == "orders.read"  # narrowed to what the rule allows
        claims = json.loads(base64.urlsafe_b64decode(answer["access_token"].split(".")[1] + "=="))
        assert claims["sub"] == "alice" and claims["aud"] == "payments"
        assert claims["act"] == {"sub": "spiffe://example.org/orders"}
        assert "x5t#S256" in claims["cnf"]

        # frontend may not exchange: not in the rules.
        refused = await post("frontend", form)
        assert refused.status_code == 400 and refused.json()["error"] == "unauthorized_client"
        wider = await post("orders", {**form, "scope": "orders.write"})
        assert wider.json()["error"] == "invalid_scope"

        # The exchanged token works at payments for orders, bound to orders' certificate (the
        # ext_authz port is on mTLS in this set-up, so ask the pipeline directly)...
        check = request(token=answer["access_token"], principal="spiffe://example.org/orders",
                        certificate=orders.cert_pem.decode(), service="payments")
        decided = await app.pipeline.decide(facts_from_check_request(check), now=time.time())
        assert decided.allowed, decided.reason
        # ...and is useless with any other certificate (RFC 8705).
        thief = request(token=answer["access_token"], principal="spiffe://example.org/frontend",
                        certificate=frontend.cert_pem.decode(), service="payments")
        stolen = await app.pipeline.decide(facts_from_check_request(thief), now=time.time())
        assert stolen.code == "cnf_mismatch"


async def test_identity_is_observable_in_metrics(tmp_path: Path) -> None:
    async with identity_stack(tmp_path) as (app, idp, _):
        token = idp.issue("shop", username="alice").access_token
        first = await ask(app, request(token=token))
        session_id = headers_of(first.ok_response.response_headers_to_add)["x-session-id"]
        await ask(app, request(session=session_id))
        text = app.metrics.exposition().decode()
        assert 'authz_identity_events_total{event="tokens_validated"} 1.0' in text
        assert 'authz_identity_events_total{event="sessions_created"} 1.0' in text
        assert 'authz_session_store_lookups_total{outcome="hits",store="memory"} 1.0' in text
        assert f'authz_jwks_available{{issuer="{idp.issuer}"}} 1.0' in text
        assert f'authz_jwks_refreshes_total{{issuer="{idp.issuer}",result="ok"}}' in text
