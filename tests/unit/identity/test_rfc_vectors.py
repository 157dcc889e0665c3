"""The RFC 7515 Appendix A and RFC 7520 §4 examples, checked in under tests/vectors/, verify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz_server.errors import TokenError
from authz_server.identity.encoding import b64url_decode
from authz_server.identity.jose import JwkSet, parse_jwk
from authz_server.identity.tokens import IssuerPolicy, validate_claims, verify_jws

VECTORS = Path(__file__).parents[2] / "vectors"
RFC7515 = sorted((VECTORS / "rfc7515").glob("*.json"))
RFC7520 = json.loads((VECTORS / "rfc7520" / "jws_examples.json").read_text())


@pytest.mark.parametrize("path", RFC7515, ids=[p.stem for p in RFC7515])
def test_rfc7515_appendix_a_example_verifies(path: Path) -> None:
    vector = json.loads(path.read_text())
    keys = JwkSet((parse_jwk(vector["jwk"]),))
    policy = IssuerPolicy("joe", ("any-audience",), algorithms=(vector["alg"],), required_claims=())
    jws = verify_jws(vector["compact"], policy, keys)
    assert jws.payload.decode() == vector["payload"]
    assert dict(jws.header) == json.loads(vector["protected_header"])
    # The example claims carry iss and exp; "now" one second before exp passes every time check.
    # They carry no aud, which this server always requires (RFC 9068 §4), so the claims step
    # stops exactly there.
    exp = vector["claims"]["exp"]
    with pytest.raises(TokenError) as caught:
        validate_claims(jws, policy, now=exp - 1)
    assert caught.value.code == "missing_claim" and "'aud'" in caught.value.message
    with pytest.raises(TokenError) as caught:
        validate_claims(jws, policy, now=exp + policy.leeway)
    assert caught.value.code == "expired_token"


@pytest.mark.parametrize("path", RFC7515, ids=[p.stem for p in RFC7515])
def test_rfc7515_example_with_one_changed_byte_fails(path: Path) -> None:
    vector = json.loads(path.read_text())
    head, body, sig = vector["compact"].split(".")
    tampered = f"{head}.{body[:-2]}Q{body[-1]}.{sig}" if body[-2] != "Q" else f"{head}.{body[:-2]}R{body[-1]}.{sig}"
    policy = IssuerPolicy("joe", ("a",), algorithms=(vector["alg"],))
    with pytest.raises(TokenError) as caught:
        verify_jws(tampered, policy, JwkSet((parse_jwk(vector["jwk"]),)))
    assert caught.value.code in ("bad_signature", "malformed_token")


def _keys(case: dict[str, Any]) -> JwkSet:
    jwk = RFC7520["keys"][case["key"]]
    if jwk["kty"] == "oct":  # a shared secret is configured explicitly, never read from a key set
        return JwkSet.shared_secret(b64url_decode(jwk["k"]), kid=jwk["kid"], alg=jwk["alg"])
    return JwkSet((parse_jwk(jwk),))


@pytest.mark.parametrize("case", RFC7520["cases"], ids=[c["section"] for c in RFC7520["cases"]])
def test_rfc7520_section_4_signature_verifies(case: dict[str, Any]) -> None:
    policy = IssuerPolicy("rfc7520", ("a",), algorithms=(case["alg"],))
    jws = verify_jws(case["compact"], policy, _keys(case))
    assert jws.payload.decode() == RFC7520["payload"]
    assert jws.algorithm == case["alg"] and jws.key.kid == RFC7520["keys"][case["key"]]["kid"]


@pytest.mark.parametrize("case", RFC7520["cases"], ids=[c["section"] for c in RFC7520["cases"]])
def test_rfc7520_example_is_refused_when_its_alg_is_not_allowed(case: dict[str, Any]) -> None:
    other = "ES256" if case["alg"] != "ES256" else "RS256"
    with pytest.raises(TokenError) as caught:
        verify_jws(case["compact"], IssuerPolicy("rfc7520", ("a",), algorithms=(other,)), _keys(case))
    assert caught.value.code == "alg_not_allowed"
