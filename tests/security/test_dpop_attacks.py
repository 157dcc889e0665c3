"""Every DPoP misuse case (tests/vectors/jwt_attacks/dpop_cases.json) is refused with its code
and a ``WWW-Authenticate: DPoP`` challenge, through the identity resolver with a real issuer
registry and session store; the well-formed request beside each attack is accepted."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.errors import IdentityError
from authz_server.identity.jose import public_jwk
from authz_server.identity.oidc import IssuerConfig, IssuerRegistry
from authz_server.identity.resolver import IdentityService, SessionSettings
from authz_server.identity.sessions import MemoryStore
from tests.support.dpop import DpopClient
from tests.support.jwt import AUDIENCE, ISSUER, issuer_jwks, issuer_token

CASES = json.loads((Path(__file__).parents[1] / "vectors" / "jwt_attacks" / "dpop_cases.json").read_text())["cases"]
URL = "https://api.test/orders"


def _facts(authorization: str, proof: str | None) -> Any:
    headers = {"authorization": authorization, "x-forwarded-proto": "https", ":authority": "api.test"}
    if proof is not None:
        headers["dpop"] = proof
    http = {"method": "GET", "path": "/orders?page=2", "host": "api.test", "scheme": "https", "headers": headers}
    return facts_from_check_request(check_request_from_json({"attributes": {"request": {"http": http}}}))


def _proof(recipe: dict[str, Any], client: DpopClient, attacker: DpopClient, token: str, now: float) -> str:
    signer = attacker if recipe.get("key") == "attacker" else client
    header: dict[str, Any] = {}
    if "typ" in recipe:
        header["typ"] = recipe["typ"]
    if "jwk" in recipe:
        jwk = recipe["jwk"]
        if jwk == "client":
            header["jwk"] = client.jwk
        elif jwk == "client_private":
            header["jwk"] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(client.private_key))
        else:
            header["jwk"] = None
    if "kid" in recipe:
        header["kid"] = recipe["kid"]
    claims: dict[str, Any] = {"htm": recipe.get("htm", "GET"), "htu": recipe.get("htu", URL)}
    iat: Any = now + recipe["iat"] if isinstance(recipe.get("iat"), (int, float)) else None
    if isinstance(recipe.get("iat"), str):
        claims["iat"] = recipe["iat"]
    if "jti" in recipe:
        claims["jti"] = recipe["jti"]
    ath_token: str | None = token
    if "ath" in recipe:
        ath_token = None if recipe["ath"] is None else token + "-other"
    if "nonce" in recipe:
        claims["nonce"] = recipe["nonce"]
    alg = recipe.get("alg")
    if alg == "none":
        proof = jwt.encode({"jti": "j", "htm": "GET", "htu": URL, "iat": int(now)}, None, algorithm="none",
                           headers={"typ": "dpop+jwt", "jwk": client.jwk})
    elif alg == "HS256":
        secret = b"s" * 32
        proof = jwt.encode({"jti": "j", "htm": "GET", "htu": URL, "iat": int(now), "ath": None}, secret,
                           algorithm="HS256", headers={"typ": "dpop+jwt", "jwk": {"kty": "oct", "k": "c3Nzc3Nz"}})
    else:
        proof = signer.proof("GET", URL, token=ath_token, iat=iat if iat is not None else now,
                             header=header, claims=claims)
        if recipe.get("jti", "x") is None or "jti" in recipe:
            pass
    if recipe.get("tamper"):
        head, body, sig = proof.split(".")
        claims_now = json.loads(jwt.utils.base64url_decode(body))
        claims_now["htu"] = URL + "/../admin"
        proof = f"{head}.{jwt.utils.base64url_encode(json.dumps(claims_now).encode()).decode()}.{sig}"
    return proof


@pytest.fixture
async def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps(issuer_jwks()))

    async def make(nonce: bool) -> IdentityService:
        dpop: Any = {"mode": "allowed", "nonce": True} if nonce else "allowed"
        config = IssuerConfig.from_mapping({"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(keys),
                                            "dpop": dpop}, "issuers[0]")
        return IdentityService(SessionSettings(), store=MemoryStore(), tokens=IssuerRegistry([config]))

    return make


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
async def test_dpop_attack_is_refused(case: dict[str, Any], world) -> None:  # type: ignore[no-untyped-def]
    identity = await world(case.get("server_nonce", False))
    now = time.time()
    client, attacker = DpopClient(), DpopClient()
    bound = case.get("bound", "client")
    token = issuer_token(now, cnf={"jkt": client.jkt} if bound else None, jti=f"jti-{case['id']}")
    scheme = case.get("scheme", "DPoP")
    recipe = case["proof"]
    proof = None if recipe is None else _proof(recipe, client, attacker, token, now)
    if case.get("twice"):
        proof = f"{proof}, {proof}"
    if case.get("replay"):
        await identity.resolve(_facts(f"{scheme} {token}", proof), now)
    with pytest.raises(IdentityError) as caught:
        await identity.resolve(_facts(f"{scheme} {token}", proof), now)
    assert caught.value.code == case["expected"], caught.value.message
    challenge = dict(caught.value.headers)
    assert challenge["www-authenticate"].startswith("DPoP ")
    if case["expected"] == "use_dpop_nonce":
        nonce = challenge["dpop-nonce"]
        # With the server's nonce the same client gets in: the refusal was about the nonce alone.
        ok = client.proof("GET", URL, token=token, nonce=nonce)
        accepted = await identity.resolve(_facts(f"DPoP {token}", ok), now)
        assert accepted.document["user"]["cnf"] == {"jkt": client.jkt}


async def test_a_good_proof_is_accepted_and_the_session_stays_bound(world) -> None:  # type: ignore[no-untyped-def]
    identity = await world(False)
    now = time.time()
    client = DpopClient()
    token = issuer_token(now, cnf={"jkt": client.jkt})
    first = await identity.resolve(_facts(f"DPoP {token}", client.proof("GET", URL, token=token)), now)
    assert first.document["user"]["cnf"] == {"jkt": client.jkt}
    session_id = dict(first.response_headers)["x-session-id"]

    def with_session(proof: str | None) -> Any:
        facts = _facts("", proof)
        facts.headers.pop("authorization")  # type: ignore[attr-defined]
        facts.headers["x-session-id"] = session_id  # type: ignore[index]
        return facts

    again = await identity.resolve(with_session(client.proof("GET", URL)), now)
    assert again.document["method"] == "session" and again.document["user"]["cnf"] == {"jkt": client.jkt}
    assert not identity.still_valid(again, now)  # never replayed from a cache: each call proves again
    for proof, code in ((None, "dpop_required"), (DpopClient().proof("GET", URL), "dpop_key_mismatch")):
        with pytest.raises(IdentityError) as caught:
            await identity.resolve(with_session(proof), now)
        assert caught.value.code == code


def test_private_key_export_is_what_the_case_says() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    exported = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    assert "d" in exported and "d" not in public_jwk(key.public_key())
    assert key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
