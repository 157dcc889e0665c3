"""Every case of the JWT attack corpus (tests/vectors/jwt_attacks/cases.json) is rejected with
its expected code: by the pure validator, and (for cases that use the default issuer policy)
by an IssuerRegistry, which must still accept a good token afterwards."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from authz_server.errors import TokenError
from authz_server.identity.encoding import b64url_decode, b64url_encode, json_compact
from authz_server.identity.jose import sign
from authz_server.identity.oidc import IssuerConfig, IssuerRegistry
from authz_server.identity.tokens import IssuerPolicy, validate_jwt
from tests.support.jwt import attacker_cert_der, attacker_keys, cert_sha256, issuer_jwks, issuer_keys, issuer_keyset

CORPUS = json.loads((Path(__file__).parents[1] / "vectors" / "jwt_attacks" / "cases.json").read_text())
CASES = CORPUS["cases"]
NOW = 1_750_000_000
ORDER_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # FIPS 186-4 D.1.2.3
_NOW_EXPR = re.compile(r"\$\{now([+-]\d+)?\}")
_NAME = re.compile(r"\$\{(\w+)\}")


def _values() -> dict[str, Any]:
    rsa, ec_ = issuer_keys()
    a_rsa, a_ec = attacker_keys()
    return {
        "issuer": CORPUS["defaults"]["policy"]["issuer"],
        "rsa_kid": rsa.kid, "ec_kid": ec_.kid, "rsa_kid_upper": rsa.kid.upper(),
        "attacker_rsa_kid": a_rsa.kid, "attacker_ec_kid": a_ec.kid,
        "attacker_rsa_jwk": dict(a_rsa.jwk),
        "attacker_x5c": base64.b64encode(attacker_cert_der()).decode(),  # x5c is base64, not base64url
        "cert_bound": b64url_encode(cert_sha256("bound client")),
        "cert_other": b64url_encode(cert_sha256("another client")),
        "nest5000": "[" * 5000 + "]" * 5000,
    }


def _resolve(value: Any, names: dict[str, Any]) -> Any:
    """Placeholders in structured recipe values: "${now+300}" → int, "${name}" → its value,
    {"$repeat": [s, n]} → s * n."""
    if isinstance(value, dict):
        if set(value) == {"$repeat"}:
            text, count = value["$repeat"]
            return text * count
        return {k: _resolve(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, names) for v in value]
    if isinstance(value, str):
        whole = _NOW_EXPR.fullmatch(value)
        if whole:
            return NOW + int(whole.group(1) or 0)
        exact = _NAME.fullmatch(value)
        if exact and exact.group(1) in names:
            return names[exact.group(1)]
        return _NAME.sub(lambda m: str(names[m.group(1)]), value)
    return value


def _resolve_text(text: str, names: dict[str, Any]) -> str:
    text = _NOW_EXPR.sub(lambda m: str(NOW + int(m.group(1) or 0)), text)
    return _NAME.sub(lambda m: str(names[m.group(1)]), text)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in changes.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def _signature(recipe: str, signing_input: bytes) -> bytes:
    rsa, ec_ = issuer_keys()
    a_rsa, a_ec = attacker_keys()
    if recipe == "none":
        return b""
    if recipe.startswith("hmac:"):
        what = recipe[len("hmac:"):]
        secret = {
            "issuer_rsa_pem": rsa.public_pem(), "issuer_ec_pem": ec_.public_pem(),
            "issuer_rsa_jwk": json.dumps(dict(rsa.jwk)).encode(), "empty": b"",
        }.get(what) if not what.startswith("text:") else what[len("text:"):].encode()
        assert secret is not None, recipe
        return sign("HS256", secret, signing_input)
    key_name, _, sign_alg = recipe.partition(":")
    pair = {"issuer_rsa": rsa, "issuer_ec": ec_, "attacker_rsa": a_rsa, "attacker_ec": a_ec}[key_name]
    return sign(sign_alg or pair.alg, pair.private_key, signing_input)


def _mangle_signature(recipe: str, signature: bytes) -> bytes:
    if recipe == "empty":
        return b""
    if recipe == "truncate":
        return signature[:-1]
    if recipe == "leading_zero":
        return b"\x00" + signature
    if recipe == "flip_bit":
        return signature[:-1] + bytes([signature[-1] ^ 0x01])
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if recipe == "ecdsa_zero":
        return bytes(64)
    if recipe == "ecdsa_r_zero":
        return bytes(32) + signature[32:]
    if recipe == "ecdsa_s_zero":
        return signature[:32] + bytes(32)
    if recipe == "ecdsa_order":
        return ORDER_P256.to_bytes(32, "big") * 2
    if recipe == "ecdsa_s_above_order":
        return signature[:32] + (ORDER_P256 + 1).to_bytes(32, "big")
    if recipe == "ecdsa_der":
        return encode_dss_signature(r, s)
    raise AssertionError(f"unknown signature recipe {recipe!r}")


def _mangle_token(recipe: str, token: str) -> str:
    head, body, sig = token.split(".")
    if recipe == "payload_plus":
        return f"{head}.{body[:10]}+{body[11:]}.{sig}"
    if recipe == "header_padding":
        return f"{head}==.{body}.{sig}"
    if recipe == "signature_noncanonical":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        assert len(sig) % 4 in (2, 3)
        return f"{head}.{body}.{sig[:-1]}{alphabet[alphabet.index(sig[-1]) | 1]}"
    if recipe == "payload_newline":
        return f"{head}.{body[:20]}\n{body[20:]}.{sig}"
    if recipe == "leading_space":
        return " " + token
    if recipe == "payload_non_ascii":
        return f"{head}.{body}\u00e9.{sig}"
    if recipe == "trailing_dot":
        return token + "."
    if recipe == "extra_segment":
        return token + "." + b64url_encode(b'{"sub":"admin"}')
    if recipe == "six_segments":
        return token + ".e30.e30.e30"
    if recipe == "drop_signature":
        return f"{head}.{body}"
    if recipe == "jwe_five_segments":
        return token + ".AAAA.AAAA"
    raise AssertionError(f"unknown token recipe {recipe!r}")


def build(case: dict[str, Any]) -> tuple[str, IssuerPolicy, bytes | None]:
    """The token, the issuer policy and the client certificate digest for one case."""
    names = _values()
    defaults = CORPUS["defaults"]
    policy_data = _merge(defaults["policy"], case.get("policy", {}))
    policy = IssuerPolicy(
        issuer=policy_data["issuer"], audiences=tuple(policy_data["audiences"]),
        algorithms=tuple(policy_data["algorithms"]), typ=policy_data.get("typ"), leeway=policy_data["leeway"],
        require_sender_constraint=policy_data.get("require_sender_constraint", False),
    )
    if "raw_header" in case:
        head_bytes = _resolve_text(case["raw_header"], names).encode(case.get("raw_header_encoding", "utf-8"))
        header: dict[str, Any] = {}
    else:
        header = _merge(defaults["header"], _resolve(case.get("header", {}), names))
        if "kid" not in case.get("header", {}):
            alg = header.get("alg")
            header["kid"] = names["ec_kid"] if isinstance(alg, str) and alg.startswith("ES") else names["rsa_kid"]
        head_bytes = json_compact(header)
    if "raw_claims" in case:
        body_bytes = _resolve_text(case["raw_claims"], names).encode()
    else:
        claims = _merge(_resolve(defaults["claims"], names), _resolve(case.get("claims", {}), names))
        body_bytes = json_compact(claims)
    signing_input = f"{b64url_encode(head_bytes)}.{b64url_encode(body_bytes)}".encode()
    alg = header.get("alg", "RS256")
    default_signer = "issuer_ec" if isinstance(alg, str) and alg.startswith("ES") else "issuer_rsa"
    signature = _signature(case.get("sign", default_signer), signing_input)
    if "signature" in case:
        signature = _mangle_signature(case["signature"], signature)
    if "payload_after_signing" in case:
        claims = _merge(_resolve(defaults["claims"], names), _resolve(case["payload_after_signing"], names))
        signing_input = f"{b64url_encode(head_bytes)}.{b64url_encode(json_compact(claims))}".encode()
    token = f"{signing_input.decode()}.{b64url_encode(signature)}"
    if "token" in case:
        token = _mangle_token(case["token"], token)
    cert = case.get("client_cert", "bound" if "cnf" in json.dumps(case.get("claims", {})) else None)
    digest = {"bound": cert_sha256("bound client"), "other": cert_sha256("another client"), None: None}[cert]
    return token, policy, digest


def test_corpus_is_well_formed() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    for case in CASES:
        assert case.get("source") and case.get("attack") and case.get("expected"), case["id"]
        assert re.fullmatch(r"[a-z0-9-]+", case["id"]), case["id"]


def test_the_default_token_of_the_corpus_is_valid() -> None:
    """Each case changes one thing; without a change the recipe builds an accepted token."""
    token, policy, digest = build({"id": "baseline"})
    verified = validate_jwt(token, policy, issuer_keyset(), now=NOW, client_cert_sha256=digest)
    assert verified.subject == "alice" and verified.issuer == policy.issuer
    es_token, _, _ = build({"id": "baseline-es256", "header": {"alg": "ES256"}})
    assert validate_jwt(es_token, policy, issuer_keyset(), now=NOW).header["alg"] == "ES256"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_attack_is_rejected(case: dict[str, Any]) -> None:
    token, policy, digest = build(case)
    with pytest.raises(TokenError) as caught:
        validate_jwt(token, policy, issuer_keyset(), now=NOW, client_cert_sha256=digest)
    assert caught.value.code == case["expected"], f"{case['id']}: {caught.value}"


async def test_registry_rejects_every_case_and_stays_healthy(tmp_path: Path) -> None:
    """The same corpus through an IssuerRegistry (static key file): same codes, except that a
    foreign issuer is untrusted before its claims are looked at; a good token passes after."""
    jwks_file = tmp_path / "idp.jwks.json"
    jwks_file.write_text(json.dumps(issuer_jwks()))
    policy = CORPUS["defaults"]["policy"]
    config = IssuerConfig.from_mapping({**policy, "leeway": "30s", "jwks_file": str(jwks_file)}, "issuers[0]")
    registry = IssuerRegistry([config], clock=lambda: NOW)
    checked = 0
    for case in CASES:
        if "policy" in case:
            continue  # those cases need an issuer policy other than the corpus default
        token, _, digest = build(case)
        with pytest.raises(TokenError) as caught:
            await registry.validate(token, now=NOW, client_cert_sha256=digest)
        assert caught.value.code == case.get("registry_expected", case["expected"]), f"{case['id']}: {caught.value}"
        checked += 1
    assert checked >= len(CASES) - 8
    good, _, _ = build({"id": "baseline"})
    assert (await registry.validate(good, now=NOW)).subject == "alice"
    status = registry.status(NOW)[0]
    # unknown kids re-read the key file at most once per interval, however many arrive
    assert status.unknown_kid_refreshes <= 1 and status.available
    await registry.close()


def test_ecdsa_high_s_twin_verifies_as_the_same_token() -> None:
    """Not an attack on validity: ECDSA signatures are malleable ((r, s) and (r, n - s) both
    verify) and RFC 7518 does not require low-S, so honest issuers produce either form. The twin
    carries the same claims and the same jti, so replay detection (keyed on jti, not on token
    bytes) treats both as one token."""
    token, policy, _ = build({"id": "es256", "header": {"alg": "ES256"}})
    head, body, sig = token.split(".")
    raw = b64url_decode(sig)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    twin = f"{head}.{body}.{b64url_encode(r.to_bytes(32, 'big') + (ORDER_P256 - s).to_bytes(32, 'big'))}"
    assert twin != token
    a = validate_jwt(token, policy, issuer_keyset(), now=NOW)
    b = validate_jwt(twin, policy, issuer_keyset(), now=NOW)
    assert a.jti == b.jti and dict(a.claims) == dict(b.claims)
    assert decode_dss_signature(encode_dss_signature(r, ORDER_P256 - s))[1] == ORDER_P256 - s


def test_validation_time_is_the_time_passed_in() -> None:
    token, policy, _ = build({"id": "baseline"})
    # the token is valid at NOW although the wall clock is years away from it
    assert abs(time.time() - NOW) > 3600
    validate_jwt(token, policy, issuer_keyset(), now=NOW)
