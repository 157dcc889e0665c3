"""jose.py: which keys are usable (the library parses, the key policy decides)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from authz_server.identity.encoding import b64url_encode
from authz_server.identity.jose import ALGORITHMS, JwkError, JwkSet, parse_jwk, parse_jwks, public_jwk, thumbprint
from tests.support.jwt import issuer_keys


def test_bad_keys_are_skipped_with_reasons_and_good_ones_kept() -> None:
    rsa_pair, ec_pair = issuer_keys()
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    leaked = dict(ec_pair.jwk, kid="leaked", d=b64url_encode(b"\x01" * 32))
    off_curve = dict(ec_pair.jwk, kid="off-curve", y=b64url_encode(b"\x00" * 31 + b"\x05"))
    document = {"keys": [
        dict(rsa_pair.jwk), public_jwk(weak.public_key(), kid="weak"), leaked, off_curve,
        {"kty": "oct", "kid": "secret", "k": b64url_encode(b"k" * 32)},
        {"kty": "RSA", "kid": "no-n", "e": "AQAB"}, {"kty": "XYZ", "kid": "alien"},
        dict(rsa_pair.jwk, kid="mislabelled", alg="ES256"), "not an object", dict(ec_pair.jwk),
    ]}
    keys = parse_jwks(json.dumps(document))
    assert keys.kids == (rsa_pair.kid, ec_pair.kid)
    reasons = "\n".join(keys.skipped)
    for expected in ("1024 bits", "private key material", "not on the curve", "symmetric", "RSA key refused",
                     "not supported", "declares alg ES256", "keys[8]"):
        assert expected in reasons
    assert len(keys.skipped) == 8


def test_a_set_without_any_usable_key_is_an_error() -> None:
    with pytest.raises(JwkError, match="no usable key"):
        parse_jwks(b'{"keys":[{"kty":"oct","k":"AAAA"}]}')
    for document in (b"[]", b'{"keys":{}}', b'{"keys":[],"keys":[]}', b"junk"):
        with pytest.raises(JwkError):
            parse_jwks(document)


def test_too_many_keys_are_cut() -> None:
    ec_pair = issuer_keys()[1]
    keys = parse_jwks({"keys": [dict(ec_pair.jwk, kid=f"k{i}") for i in range(105)]})
    assert len(keys.keys) == 100 and len(keys.skipped) == 5


def test_key_use_and_ops_restrict_verification() -> None:
    ec_pair = issuer_keys()[1]
    es256 = ALGORITHMS["ES256"]
    assert parse_jwk(dict(ec_pair.jwk)).fits(es256)
    assert not parse_jwk(dict(ec_pair.jwk, use="enc")).fits(es256)
    assert not parse_jwk(dict(ec_pair.jwk, key_ops=["sign"])).fits(es256)
    assert parse_jwk(dict(ec_pair.jwk, key_ops=["verify"])).fits(es256)
    assert not parse_jwk(dict(ec_pair.jwk)).fits(ALGORITHMS["ES384"])


def test_kid_lookup_is_exact() -> None:
    rsa_pair = issuer_keys()[0]
    keys = JwkSet((parse_jwk(dict(rsa_pair.jwk)),))
    assert keys.with_kid(rsa_pair.kid)
    for variant in (rsa_pair.kid.upper(), rsa_pair.kid + " ", "../" + rsa_pair.kid, rsa_pair.kid[:-1]):
        assert keys.with_kid(variant) == ()


def test_shared_secret_needs_enough_bytes() -> None:
    with pytest.raises(JwkError, match="at least 32"):
        JwkSet.shared_secret(b"short")
    with pytest.raises(JwkError, match="at least 64"):
        JwkSet.shared_secret(b"x" * 48, alg="HS512")
    assert JwkSet.shared_secret(b"x" * 32).keys[0].kty == "oct"


def test_rfc7638_thumbprint_example() -> None:
    """RFC 7638 §3.1: the example RSA key's thumbprint."""
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29", "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
        "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZ"
        "Hzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-"
        "kEgU8awapJzKnqDKgw")}
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
