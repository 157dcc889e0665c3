"""Tokens without ``jti`` (issue 23, item 8): by default tracked by a digest of their signed
part, so the first client owns the token until it expires, whatever form its signature takes;
``sessions.tokens_without_jti: refuse`` turns them away. Real validation (IssuerRegistry over a
JWKS file), real in-memory session store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authz_server.config import config_from_mapping
from authz_server.errors import ConfigError, ReplayError, TokenError
from authz_server.identity.encoding import b64url_decode, b64url_encode
from authz_server.identity.oidc import IssuerConfig, IssuerRegistry
from authz_server.identity.resolver import IdentityService, SessionSettings
from authz_server.identity.sessions import MemoryStore
from authz_server.identity.workloads import PrincipalVerifier
from authz_server.identity.spiffe import accept_trust_domains
from tests.support.audit import facts_for
from tests.support.jwt import AUDIENCE, ISSUER, issuer_jwks, issuer_token

NOW = 1_750_000_000.0
ALICE_APP, THIEF = "spiffe://example.org/alice-app", "spiffe://example.org/thief"


def service(tmp_path: Path, **settings: object) -> IdentityService:
    jwks = tmp_path / "idp.jwks.json"
    jwks.write_text(json.dumps(issuer_jwks()))
    issuer = IssuerConfig.from_mapping({"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks)},
                                       "issuers[0]")
    return IdentityService(SessionSettings(**settings), store=MemoryStore(),  # type: ignore[arg-type]
                           tokens=IssuerRegistry([issuer], clock=lambda: NOW),
                           workloads=PrincipalVerifier(accept_trust_domains(("example.org",))))


async def present(identity: IdentityService, token: str, client: str) -> str:
    facts = facts_for("/orders", principal=client, headers={"authorization": f"Bearer {token}"})
    resolved = await identity.resolve(facts, NOW)
    return resolved.document["user"]["sub"]


def other_ecdsa_form(token: str) -> str:
    """The same ES256 token with its signature's second valid form, (r, n - s)."""
    head, body, signature = token.split(".")
    raw = b64url_decode(signature)
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 (FIPS 186-4 D.1.2.3)
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{b64url_encode(r + (order - s).to_bytes(32, 'big'))}"


async def test_a_token_without_jti_is_owned_by_its_first_client_whatever_its_signature(tmp_path: Path) -> None:
    identity = service(tmp_path)
    token = issuer_token(NOW, alg="ES256", jti=None)
    assert await present(identity, token, ALICE_APP) == "alice"
    assert await present(identity, token, ALICE_APP) == "alice"  # its owner may use it again
    twin = other_ecdsa_form(token)
    assert twin != token
    assert await present(identity, twin, ALICE_APP) == "alice"  # a valid token: its signature verifies
    for stolen in (token, twin):
        with pytest.raises(ReplayError) as caught:
            await present(identity, stolen, THIEF)
        assert caught.value.code == "token_replay"
        assert ALICE_APP in caught.value.message and "without jti" in caught.value.message
    assert identity.stats.replays == 2


async def test_tokens_with_a_jti_are_still_tracked_by_it(tmp_path: Path) -> None:
    identity = service(tmp_path)
    assert await present(identity, issuer_token(NOW, jti="j-1"), ALICE_APP) == "alice"
    with pytest.raises(ReplayError):
        await present(identity, issuer_token(NOW, jti="j-1", scope="other"), THIEF)  # another token, the same jti
    assert await present(identity, issuer_token(NOW, jti=None), THIEF) == "alice"  # its own token: not a replay


async def test_refuse_turns_tokens_without_jti_away(tmp_path: Path) -> None:
    identity = service(tmp_path, tokens_without_jti="refuse")
    with pytest.raises(TokenError) as caught:
        await present(identity, issuer_token(NOW, jti=None), ALICE_APP)
    assert caught.value.code == "missing_claim" and "jti" in caught.value.message
    assert await present(identity, issuer_token(NOW, jti="j-2"), ALICE_APP) == "alice"


def test_the_setting_is_read_from_sessions_and_defaults_to_digest() -> None:
    assert config_from_mapping({}).sessions.settings.tokens_without_jti == "digest"
    for value in ("refuse", "digest"):
        read = config_from_mapping({"sessions": {"tokens_without_jti": value}})
        assert read.sessions.settings.tokens_without_jti == value
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"sessions": {"tokens_without_jti": "allow"}})
    assert caught.value.key == "sessions.tokens_without_jti"
