"""tokens.py: the claims step at its edges, peek_issuer, typ, cnf, and the strict encodings."""

from __future__ import annotations

import hashlib
import json

import pytest

from authz_server.errors import TokenError
from authz_server.identity.encoding import b64url_decode, b64url_encode, json_object
from authz_server.identity.jose import JwkSet
from authz_server.identity.tokens import (
    IssuerPolicy, VerifiedToken, cert_thumbprint, peek_issuer, validate_claims, validate_jwt, verify_jws,
)
from tests.support.jwt import AUDIENCE, ISSUER, issuer_keys, issuer_keyset, issuer_token, signed

NOW = 1_750_000_000.0
POLICY = IssuerPolicy(ISSUER, (AUDIENCE,), leeway=30)


def code_of(token: str, policy: IssuerPolicy = POLICY, *, now: float = NOW, **kwargs: object) -> str:
    with pytest.raises(TokenError) as caught:
        validate_jwt(token, policy, issuer_keyset(), now=now, **kwargs)  # type: ignore[arg-type]
    return caught.value.code


# -- a good token, both steps

def test_valid_token_gives_every_field() -> None:
    token = issuer_token(NOW, nbf=int(NOW) - 10)
    verified = validate_jwt(token, POLICY, issuer_keyset(), now=NOW)
    assert isinstance(verified, VerifiedToken)
    assert (verified.issuer, verified.subject, verified.audience) == (ISSUER, "alice", (AUDIENCE,))
    assert verified.jti == "jti-1"
    assert verified.expires_at == int(NOW) + 300 and verified.issued_at == int(NOW)
    assert verified.not_before == int(NOW) - 10 and verified.cnf_x5t_s256 is None
    assert verified.header["kid"] == issuer_keys()[0].kid and verified.claims["scope"] == "orders:read"
    with pytest.raises(TypeError):
        verified.claims["sub"] = "admin"  # type: ignore[index]


def test_es256_token_validates() -> None:
    assert validate_jwt(issuer_token(NOW, alg="ES256"), POLICY, issuer_keyset(), now=NOW).subject == "alice"


def test_signature_step_does_not_read_the_claims() -> None:
    # a payload that is not JSON passes step 1 when signed, and fails step 2
    rsa = issuer_keys()[0]
    token = signed({"alg": "RS256", "kid": rsa.kid}, b"not json", "RS256", rsa.private_key)
    jws = verify_jws(token, POLICY, issuer_keyset())
    assert jws.payload == b"not json" and jws.algorithm == "RS256" and jws.key.kid == rsa.kid
    with pytest.raises(TokenError) as caught:
        validate_claims(jws, POLICY, now=NOW)
    assert caught.value.code == "malformed_token"


def test_audience_list_matches_any_accepted_audience() -> None:
    token = issuer_token(NOW, aud=["billing-api", AUDIENCE])
    assert validate_jwt(token, POLICY, issuer_keyset(), now=NOW).audience == ("billing-api", AUDIENCE)
    two = IssuerPolicy(ISSUER, ("inventory", "billing-api"))
    assert validate_jwt(token, two, issuer_keyset(), now=NOW).subject == "alice"


# -- leeway edges (RFC 7519 §4.1.4-4.1.6)

@pytest.mark.parametrize("offset, ok", [(-31, False), (-30, False), (-29, True), (0, True), (100, True)])
def test_exp_with_leeway(offset: int, ok: bool) -> None:
    """Valid while now < exp + leeway: exactly at exp + leeway it has expired."""
    token = issuer_token(NOW, exp=int(NOW) + offset, iat=int(NOW) - 600)
    if ok:
        validate_jwt(token, POLICY, issuer_keyset(), now=NOW)
    else:
        assert code_of(token) == "expired_token"


@pytest.mark.parametrize("offset, ok", [(29, True), (30, True), (31, False), (3600, False)])
def test_nbf_with_leeway(offset: int, ok: bool) -> None:
    """Valid once now + leeway >= nbf."""
    token = issuer_token(NOW, nbf=int(NOW) + offset, exp=int(NOW) + 7200)
    if ok:
        validate_jwt(token, POLICY, issuer_keyset(), now=NOW)
    else:
        assert code_of(token) == "token_not_yet_valid"


@pytest.mark.parametrize("offset, ok", [(30, True), (31, False)])
def test_iat_in_the_future_with_leeway(offset: int, ok: bool) -> None:
    token = issuer_token(NOW, iat=int(NOW) + offset, exp=int(NOW) + 7200)
    if ok:
        validate_jwt(token, POLICY, issuer_keyset(), now=NOW)
    else:
        assert code_of(token) == "iat_in_future"


def test_zero_leeway_is_exact() -> None:
    strict = IssuerPolicy(ISSUER, (AUDIENCE,), leeway=0)
    token = issuer_token(NOW, exp=int(NOW) + 1)
    validate_jwt(token, strict, issuer_keyset(), now=NOW + 0.999)
    assert code_of(token, strict, now=NOW + 1) == "expired_token"


def test_fractional_numeric_dates_are_numbers() -> None:
    token = issuer_token(NOW, exp=NOW + 10.5, iat=NOW - 0.25)
    assert validate_jwt(token, POLICY, issuer_keyset(), now=NOW).expires_at == NOW + 10.5


# -- required claims and types

def test_required_claims_are_configurable() -> None:
    relaxed = IssuerPolicy(ISSUER, (AUDIENCE,), required_claims=())
    token = issuer_token(NOW, sub=None, iat=None, jti=None, client_id=None)
    assert validate_jwt(token, relaxed, issuer_keyset(), now=NOW).subject == ""
    assert code_of(token) == "missing_claim"  # default policy requires sub and iat
    wants_tenant = IssuerPolicy(ISSUER, (AUDIENCE,), required_claims=("sub", "tenant"))
    assert code_of(issuer_token(NOW), wants_tenant) == "missing_claim"
    validate_jwt(issuer_token(NOW, tenant="eu"), wants_tenant, issuer_keyset(), now=NOW)


def test_at_jwt_policy_requires_the_rfc_9068_claims() -> None:
    at = IssuerPolicy(ISSUER, (AUDIENCE,), typ="at+jwt", required_claims=())
    for claim in ("sub", "client_id", "iat", "jti"):
        with pytest.raises(TokenError) as caught:
            validate_jwt(issuer_token(NOW, **{claim: None}), at, issuer_keyset(), now=NOW)
        assert caught.value.code == "missing_claim" and claim in caught.value.message


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/At+JWT"])
def test_typ_at_jwt_in_any_spelling_rfc_9068_allows(typ: str) -> None:
    at = IssuerPolicy(ISSUER, (AUDIENCE,), typ="at+jwt")
    validate_jwt(issuer_token(NOW, header={"typ": typ}), at, issuer_keyset(), now=NOW)


@pytest.mark.parametrize("typ, ok", [(None, True), ("JWT", True), ("at+jwt", True), ("logout+jwt", False),
                                     ("application/secevent+jwt", False)])
def test_without_a_configured_typ_other_kinds_of_jwt_are_refused(typ: str | None, ok: bool) -> None:
    token = issuer_token(NOW, header={"typ": typ})
    if ok:
        validate_jwt(token, POLICY, issuer_keyset(), now=NOW)
    else:
        assert code_of(token) == "wrong_typ"


# -- RFC 8705 certificate binding

def test_cnf_binding_accepts_the_bound_certificate_in_every_form() -> None:
    der = b"pretend DER of the client certificate"
    digest = hashlib.sha256(der).digest()
    thumb = cert_thumbprint(der)
    assert thumb == b64url_encode(digest) and len(thumb) == 43
    token = issuer_token(NOW, cnf={"x5t#S256": thumb})
    for presented in (digest, digest.hex(), thumb):
        verified = validate_jwt(token, POLICY, issuer_keyset(), now=NOW, client_cert_sha256=presented)
        assert verified.cnf_x5t_s256 == thumb
    assert code_of(token, client_cert_sha256=hashlib.sha256(b"other").digest()) == "cnf_mismatch"
    assert code_of(token, client_cert_sha256="") == "cnf_mismatch"
    assert code_of(token, client_cert_sha256="not-a-digest") == "cnf_mismatch"


def test_sender_constraint_required_by_policy() -> None:
    bound_only = IssuerPolicy(ISSUER, (AUDIENCE,), require_sender_constraint=True)
    assert code_of(issuer_token(NOW), bound_only, client_cert_sha256=b"\x00" * 32) == "cnf_required"
    thumb = b64url_encode(b"\x01" * 32)
    validate_jwt(issuer_token(NOW, cnf={"x5t#S256": thumb}), bound_only, issuer_keyset(), now=NOW,
                 client_cert_sha256=b"\x01" * 32)


# -- keys and algorithms

def test_no_kid_with_one_fitting_key_and_with_several() -> None:
    rsa = issuer_keys()[0]
    token = signed({"alg": "RS256", "typ": "at+jwt"}, _claims(), "RS256", rsa.private_key)
    validate_jwt(token, POLICY, issuer_keyset(), now=NOW)  # one RSA key in the set
    two_rsa = JwkSet(issuer_keyset().keys + (issuer_keyset().keys[0],))
    with pytest.raises(TokenError) as caught:
        validate_jwt(token, POLICY, two_rsa, now=NOW)
    assert caught.value.code == "missing_kid"


def test_hmac_only_with_an_explicit_shared_secret() -> None:
    secret = b"s" * 32
    hs = IssuerPolicy(ISSUER, (AUDIENCE,), algorithms=("HS256",))
    token = signed({"alg": "HS256", "typ": "at+jwt"}, _claims(), "HS256", secret)
    validate_jwt(token, hs, JwkSet.shared_secret(secret), now=NOW)
    assert code_of(token, hs) == "unknown_kid"  # the issuer's public keys are no HMAC secrets
    assert code_of(token) == "alg_not_allowed"


def test_policy_refuses_none_and_unknown_algorithms() -> None:
    for algorithms in (("none",), ("NONE",), ("RS256", "HS1"), ()):
        with pytest.raises(ValueError):
            IssuerPolicy(ISSUER, (AUDIENCE,), algorithms=algorithms)
    with pytest.raises(ValueError):
        IssuerPolicy(ISSUER, ())


# -- peek_issuer

def test_peek_issuer_reads_iss_without_verifying() -> None:
    rsa = issuer_keys()[0]
    forged = signed({"alg": "RS256"}, {"iss": "https://anyone.example"}, None, rsa.private_key)
    assert peek_issuer(forged) == "https://anyone.example"
    assert peek_issuer(issuer_token(NOW)) == ISSUER


@pytest.mark.parametrize("token, code", [
    ("a.b", "malformed_token"),
    ("a.b.c.d.e", "unsupported_token"),
    ("x" * 20_000, "token_too_large"),
    ("eyJhbGciOiJSUzI1NiJ9.e30.", "missing_claim"),
    ("eyJhbGciOiJSUzI1NiJ9." + b64url_encode(b'{"iss":1}') + ".", "invalid_claim"),
    ("eyJhbGciOiJSUzI1NiJ9." + b64url_encode(b'{"iss":"a","iss":"b"}') + ".", "malformed_token"),
    ("eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJhIn0=.", "malformed_token"),
    ("eyJhbGciOiJSUzI1NiJ9.e30+.", "malformed_token"),
])
def test_peek_issuer_is_strict(token: str, code: str) -> None:
    with pytest.raises(TokenError) as caught:
        peek_issuer(token)
    assert caught.value.code == code


def test_peek_issuer_caps_are_configurable() -> None:
    token = issuer_token(NOW)
    with pytest.raises(TokenError) as caught:
        peek_issuer(token, max_token_bytes=len(token) - 1)
    assert caught.value.code == "token_too_large"


# -- strict encodings

@pytest.mark.parametrize("text", ["", "Zg", "Zm8", "Zm9v", "-_-_"])
def test_b64url_round_trips(text: str) -> None:
    assert b64url_encode(b64url_decode(text)) == text


@pytest.mark.parametrize("text", ["Zg==", "Zh", "Zm9", "Z", "Zm+v", "Zm/v", "Zm9v\n", " Zm9v", "Zm9v="])
def test_b64url_refuses_other_spellings(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


@pytest.mark.parametrize("data", [b'{"a":1,"a":2}', b'{"a":{"b":1,"b":1}}', b"[1]", b'{"a":NaN}',
                                  b'{"a":1e999}', b'{"a":18446744073709551616}', b'{"a":-9223372036854775809}',
                                  b'{"a":[' + b"9" * 5000 + b']}', '{"a":1}'.encode("utf-16"), b"\xef\xbb\xbf{}", b'{"a":"\xff"}'])
def test_json_object_is_strict(data: bytes) -> None:
    with pytest.raises(ValueError):
        json_object(data)


@pytest.mark.parametrize("number", [b"-9223372036854775808", b"18446744073709551615", b"0", b"-0", b"1e308"])
def test_json_object_takes_every_64_bit_integer_and_double(number: bytes) -> None:
    assert json_object(b'{"a":' + number + b"}")["a"] == json.loads(number)


def _claims() -> dict[str, object]:
    return {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "exp": int(NOW) + 300, "iat": int(NOW)}
