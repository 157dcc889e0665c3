"""The SPIFFE bundle format (Trust Domain and Bundle standard §4): what we publish, and what we
accept when reading one back."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from cryptography.hazmat.primitives import serialization
from spiffe import JwtBundle, TrustDomain, X509Bundle

from authz_server.workload.bundle import BundleError, TrustBundle, parse_spiffe_bundle
from authz_server.workload.ca import create_authority

NOW = 1_700_000_000.0  # a fixed clock: every check here takes `now`


@pytest.fixture(scope="module")
def bundle() -> TrustBundle:
    old = create_authority("example.org", ttl=3600, jwt_algorithm="ES256", now=NOW - 1800)
    new = create_authority("example.org", ttl=3600, jwt_algorithm="RS256", now=NOW)
    return TrustBundle("example.org", (old.certificate, new.certificate),
                       ((old.jwt_kid, old.jwt_key.public_key()), (new.jwt_kid, new.jwt_key.public_key())),
                       sequence=7, refresh_hint=300)


def test_document_shape(bundle: TrustBundle) -> None:
    doc = bundle.to_spiffe()
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    x509_keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_keys) == 2 and len(jwt_keys) == 2
    for key, cert in zip(x509_keys, bundle.x509_authorities):
        # exactly one certificate in x5c, the CA itself, whose public key the JWK is
        assert key["x5c"] == [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        assert key["kty"] == "EC" and key["crv"] == "P-256"
    assert [k["kid"] for k in jwt_keys] == [kid for kid, _ in bundle.jwt_authorities]
    assert {k["kty"] for k in jwt_keys} == {"EC", "RSA"}
    assert all("d" not in k for k in doc["keys"])  # public keys only


def test_round_trip(bundle: TrustBundle) -> None:
    back = parse_spiffe_bundle("example.org", bundle.to_json())
    assert back.x509_authorities == bundle.x509_authorities
    assert [kid for kid, _ in back.jwt_authorities] == [kid for kid, _ in bundle.jwt_authorities]
    assert back.x509_der() == bundle.x509_der()
    assert back.jwks() == bundle.jwks()
    assert (back.sequence, back.refresh_hint) == (7, 300.0)


def test_pyspiffe_reads_what_the_workload_api_serves(bundle: TrustBundle) -> None:
    x509_bundle = X509Bundle.parse_raw(TrustDomain("example.org"), bundle.x509_der())
    assert len(x509_bundle.x509_authorities) == 2
    jwt_bundle = JwtBundle.parse(TrustDomain("example.org"), json.dumps(bundle.jwks()).encode())
    assert set(jwt_bundle.jwt_authorities) == {kid for kid, _ in bundle.jwt_authorities}


def test_unknown_use_is_ignored(bundle: TrustBundle) -> None:
    doc = bundle.to_spiffe()
    doc["keys"].append({**doc["keys"][-1], "use": "wit-svid"})
    doc["keys"].append({k: v for k, v in doc["keys"][0].items() if k != "use"})
    back = parse_spiffe_bundle("example.org", doc)
    assert len(back.x509_authorities) == 2 and len(back.jwt_authorities) == 2


def broken(doc: dict, change) -> dict:  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d.pop("keys"), "no 'keys' array"),
    (lambda d: d.update(spiffe_sequence=-1), "spiffe_sequence"),
    (lambda d: d.update(spiffe_refresh_hint="5m"), "spiffe_refresh_hint"),
    (lambda d: d["keys"][0].update(x5c=[]), "exactly one certificate"),
    (lambda d: d["keys"][0].update(x5c=[d["keys"][0]["x5c"][0]] * 2), "exactly one certificate"),
    (lambda d: d["keys"][0].update(x5c=["bm90IGEgY2VydA=="]), "not a DER certificate"),
    (lambda d: d["keys"][0].update(x=d["keys"][1]["x"], y=d["keys"][1]["y"]), "not the public key"),
    (lambda d: d["keys"][2].pop("kid"), "must have a 'kid'"),
    (lambda d: d["keys"][2].update(d="c2VjcmV0"), "private key material"),
])
def test_bad_documents_are_refused(bundle: TrustBundle, change, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BundleError) as caught:
        parse_spiffe_bundle("example.org", broken(bundle.to_spiffe(), change))
    assert fragment in str(caught.value)
    assert "example.org" in str(caught.value)


def test_not_json() -> None:
    with pytest.raises(BundleError, match="not JSON"):
        parse_spiffe_bundle("example.org", b"{")
