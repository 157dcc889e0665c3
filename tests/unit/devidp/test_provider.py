"""The dev provider's endpoints through its real HTTP handler (no socket needed), and its config."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from authz_server.devidp import DevIdP, DevIdPConfig, load_devidp_config
from authz_server.errors import ConfigError
from authz_server.http import HttpRequest
from authz_server.identity.jose import parse_jwks
from authz_server.identity.tokens import IssuerPolicy, validate_jwt

T0 = 1_750_000_000.0
CONFIG = {
    "issuer": "http://127.0.0.1:9400/realms/demo",
    "token_ttl": "10m",
    "users": [{"username": "alice", "password": "alice-pw", "claims": {"roles": ["customer"], "groups": ["eu"]}},
              {"username": "bob", "password": "bob-pw", "subject": "user-0002"}],
    "clients": [
        {"client_id": "frontend", "client_secret": "fe-secret", "grants": ["password", "client_credentials"],
         "audiences": ["orders-api", "payments-api"], "scopes": ["orders:read", "orders:write"]},
        {"client_id": "batch", "client_secret": "batch secret:with colon", "audiences": ["orders-api"],
         "algorithm": "ES256", "claims": {"roles": ["service"]}},
    ],
}


@pytest.fixture
def idp() -> DevIdP:
    return DevIdP(DevIdPConfig.from_mapping(CONFIG), clock=lambda: T0)


def post(idp: DevIdP, form: dict[str, str], *, basic: tuple[str, str] | None = None,
         content_type: str = "application/x-www-form-urlencoded", raw: bytes | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"content-type": content_type}
    if basic is not None:
        pair = f"{basic[0]}:{basic[1]}".encode()
        headers["authorization"] = "Basic " + base64.b64encode(pair).decode()
    body = raw if raw is not None else urlencode(form).encode()
    response = idp.handle(HttpRequest("POST", "/realms/demo/token", headers, body))
    return response.status, json.loads(response.body), dict(response.headers)


def validate(idp: DevIdP, token: str, audience: str = "orders-api"):
    keys = parse_jwks(json.dumps(idp.jwks()))
    policy = IssuerPolicy(idp.issuer, (audience,), typ="at+jwt")
    return validate_jwt(token, policy, keys, now=T0)


def test_discovery_and_jwks_live_under_the_issuer_path(idp: DevIdP) -> None:
    response = idp.handle(HttpRequest("GET", "/realms/demo/.well-known/openid-configuration", {}))
    metadata = json.loads(response.body)
    assert metadata["issuer"] == "http://127.0.0.1:9400/realms/demo"
    assert metadata["jwks_uri"] == "http://127.0.0.1:9400/realms/demo/jwks"
    assert metadata["token_endpoint"] == "http://127.0.0.1:9400/realms/demo/token"
    assert "authorization_endpoint" not in metadata  # only what exists is advertised
    jwks = idp.handle(HttpRequest("GET", "/realms/demo/jwks", {}))
    assert ("cache-control", "public, max-age=300") in jwks.headers
    assert len(json.loads(jwks.body)["keys"]) == 2
    assert idp.handle(HttpRequest("GET", "/jwks", {})).status == 404
    assert idp.handle(HttpRequest("POST", "/realms/demo/jwks", {})).status == 405
    assert idp.requests == {"discovery": 1, "jwks": 1, "token": 0}


def test_password_grant_with_basic_auth_gives_an_rfc_9068_token(idp: DevIdP) -> None:
    status, body, headers = post(idp, {"grant_type": "password", "username": "alice", "password": "alice-pw",
                                       "scope": "orders:read"}, basic=("frontend", "fe-secret"))
    assert status == 200, body
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600 and body["scope"] == "orders:read"
    assert headers["cache-control"] == "no-store"
    verified = validate(idp, body["access_token"])
    assert verified.header["typ"] == "at+jwt" and verified.header["alg"] == "RS256"
    claims = verified.claims
    assert (claims["sub"], claims["client_id"], claims["scope"]) == ("alice", "frontend", "orders:read")
    assert claims["aud"] == ["orders-api", "payments-api"] and claims["roles"] == ["customer"]
    assert claims["exp"] - claims["iat"] == 600 and claims["auth_time"] == claims["iat"] and claims["jti"]


def test_client_credentials_with_post_auth_es256_and_client_claims(idp: DevIdP) -> None:
    status, body, _ = post(idp, {"grant_type": "client_credentials", "client_id": "batch",
                                 "client_secret": "batch secret:with colon"})
    assert status == 200, body
    verified = validate(idp, body["access_token"])
    assert verified.header["alg"] == "ES256" and verified.subject == "batch"
    assert verified.claims["roles"] == ["service"] and "scope" not in verified.claims


def test_basic_auth_form_encodes_id_and_secret(idp: DevIdP) -> None:
    # RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding
    status, body, _ = post(idp, {"grant_type": "client_credentials"}, basic=("batch", "batch+secret%3Awith+colon"))
    assert status == 200, body


def test_audience_selection(idp: DevIdP) -> None:
    status, body, _ = post(idp, {"grant_type": "client_credentials", "audience": "payments-api"},
                           basic=("frontend", "fe-secret"))
    assert status == 200 and validate(idp, body["access_token"], "payments-api").audience == ("payments-api",)
    status, body, _ = post(idp, {"grant_type": "client_credentials", "audience": "admin-api"},
                           basic=("frontend", "fe-secret"))
    assert (status, body["error"]) == (400, "invalid_target")


@pytest.mark.parametrize("form, basic, status, error", [
    ({"grant_type": "client_credentials"}, ("frontend", "wrong"), 401, "invalid_client"),
    ({"grant_type": "client_credentials"}, ("nobody", "x"), 401, "invalid_client"),
    ({"grant_type": "client_credentials"}, None, 401, "invalid_client"),
    ({"grant_type": "client_credentials", "client_id": "frontend", "client_secret": "fe-secret"},
     ("frontend", "fe-secret"), 400, "invalid_request"),
    ({"client_id": "frontend", "client_secret": "fe-secret"}, None, 400, "invalid_request"),
    ({"grant_type": "authorization_code"}, ("frontend", "fe-secret"), 400, "unsupported_grant_type"),
    ({"grant_type": "password", "username": "alice", "password": "alice-pw"}, ("batch", "batch secret:with colon"),
     400, "unauthorized_client"),
    ({"grant_type": "password", "username": "alice", "password": "nope"}, ("frontend", "fe-secret"), 400,
     "invalid_grant"),
    ({"grant_type": "password", "username": "mallory", "password": "x"}, ("frontend", "fe-secret"), 400,
     "invalid_grant"),
    ({"grant_type": "password", "username": "alice"}, ("frontend", "fe-secret"), 400, "invalid_request"),
    ({"grant_type": "client_credentials", "scope": "admin"}, ("frontend", "fe-secret"), 400, "invalid_scope"),
])
def test_token_endpoint_errors_follow_rfc_6749(idp: DevIdP, form: dict[str, str], basic: tuple[str, str] | None,
                                               status: int, error: str) -> None:
    got, body, headers = post(idp, form, basic=basic)
    assert (got, body["error"]) == (status, error), body
    if status == 401 and basic is not None:
        assert headers["www-authenticate"].startswith("Basic")


def test_repeated_parameters_and_wrong_media_type(idp: DevIdP) -> None:
    status, body, _ = post(idp, {}, basic=("frontend", "fe-secret"),
                           raw=b"grant_type=client_credentials&grant_type=password")
    assert (status, body["error"]) == (400, "invalid_request") and "repeated" in body["error_description"]
    status, body, _ = post(idp, {"grant_type": "client_credentials"}, basic=("frontend", "fe-secret"),
                           content_type="application/json")
    assert (status, body["error"]) == (400, "invalid_request")
    assert idp.handle(HttpRequest("GET", "/realms/demo/token", {})).status == 405


def test_in_process_issue(idp: DevIdP) -> None:
    issued = idp.issue("frontend", username="bob", scope="orders:write")
    verified = validate(idp, issued.access_token)
    assert verified.subject == "user-0002" and verified.claims["scope"] == "orders:write"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cases = [
        ({"clients": [{"client_id": "a", "client_secret": "s", "audiences": ["x"], "grants": ["implicit"]}]},
         "clients[0].grants"),
        ({"clients": [{"client_id": "a", "client_secret": "s"}]}, "clients[0].audiences"),
        ({"users": [{"username": "a", "password": "p", "claims": {"sub": "admin"}}]}, "users[0].claims.sub"),
        ({"users": [{"username": "a", "password": "p"}, {"username": "a", "password": "q"}]}, "users[1].username"),
        ({"algorithms": ["HS256"]}, "algorithms"),
        ({"token_ttl": "soon"}, "token_ttl"),
        ({"key_rotation": "1h", "key_publish_ahead": "2h"}, "key_publish_ahead"),
        ({"userz": []}, "userz"),
    ]
    for data, key in cases:
        with pytest.raises(ConfigError) as caught:
            DevIdPConfig.from_mapping(data)
        assert caught.value.key == key, (data, caught.value)
    path = tmp_path / "idp.yaml"
    path.write_text("issuer: http://127.0.0.1:9400\nusers:\n  - {username: alice, password: pw}\n")
    assert load_devidp_config(path).users[0].subject == "alice"
