"""X.509-SVIDs and JWT-SVIDs as the SPIFFE standards define them, checked directly and by
py-spiffe's own parsers (an independent reader of the same standards)."""

from __future__ import annotations

import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import JwtBundle, JwtSvid, TrustDomain
from spiffe import X509Svid as PySpiffeX509Svid

from authz_server.identity.encoding import b64url_decode, b64url_encode, json_compact
from authz_server.identity.jose import sign
from authz_server.workload.ca import create_authority
from authz_server.workload.svid import BACKDATE, SvidError, issue_jwt_svid, issue_x509_svid, validate_jwt_svid

NOW = 1_700_000_000.0  # a fixed clock: every check here takes `now`
ID = "spiffe://example.org/orders"


@pytest.fixture(scope="module")
def authority():  # type: ignore[no-untyped-def]
    return create_authority("example.org", ttl=86400, jwt_algorithm="ES256", now=NOW)


@pytest.fixture(scope="module")
def other_authority():  # type: ignore[no-untyped-def]
    return create_authority("evil.org", ttl=86400, jwt_algorithm="ES256", now=NOW)


def issue(authority, ttl: float = 3600, spiffe_id: str = ID, now: float = NOW):  # type: ignore[no-untyped-def]
    return issue_x509_svid(spiffe_id, ca_certificate=authority.certificate, ca_key=authority.private_key,
                           authority_id=authority.id, ttl=ttl, now=now)


def test_x509_svid_follows_the_spec(authority) -> None:  # type: ignore[no-untyped-def]
    svid = issue(authority, ttl=60)
    cert = svid.certificate
    # §2: exactly one URI SAN, the SPIFFE ID
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert len(list(sans)) == 1
    # §4.1: not a CA, critical
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    # §4.3: digitalSignature set, keyCertSign and cRLSign not; critical
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and not usage.value.key_cert_sign and not usage.value.crl_sign
    # §4.4: serverAuth and clientAuth
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # short lifetime: ttl from now (backdated a little for clock skew), re-issued at half of it
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(NOW + 60, abs=1)
    assert cert.not_valid_before_utc.timestamp() == pytest.approx(NOW - BACKDATE, abs=1)
    assert svid.refresh_at == pytest.approx(NOW + 30, abs=0.01)
    # signed by the CA
    cert.verify_directly_issued_by(authority.certificate)
    assert isinstance(svid.private_key, ec.EllipticCurvePrivateKey)
    assert svid.private_key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_dns_names_are_extra_sans_and_the_spiffe_id_stays_the_one_uri(authority) -> None:  # type: ignore[no-untyped-def]
    svid = issue_x509_svid(ID, ca_certificate=authority.certificate, ca_key=authority.private_key,
                           authority_id=authority.id, ttl=60, now=NOW, dns_names=("orders", "orders.mesh"))
    sans = svid.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert sans.get_values_for_type(x509.DNSName) == ["orders", "orders.mesh"]
    common_names = svid.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [attribute.value for attribute in common_names] == ["orders"]
    assert str(PySpiffeX509Svid.parse_raw(svid.chain_der(), svid.key_der()).spiffe_id) == ID


def test_pyspiffe_accepts_the_svid_and_the_ca(authority) -> None:  # type: ignore[no-untyped-def]
    svid = issue(authority)
    parsed = PySpiffeX509Svid.parse_raw(svid.chain_der(), svid.key_der())
    assert str(parsed.spiffe_id) == ID
    pem = PySpiffeX509Svid.parse(svid.chain_pem(), svid.key_pem())
    assert pem.leaf.serial_number == svid.serial_number


def test_ca_certificate(authority) -> None:  # type: ignore[no-untyped-def]
    cert = authority.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    cert.verify_directly_issued_by(cert)


def test_svid_never_outlives_its_ca() -> None:
    short_ca = create_authority("example.org", ttl=100, jwt_algorithm="ES256", now=NOW)
    svid = issue(short_ca, ttl=3600)
    assert svid.expires_at == pytest.approx(NOW + 100, abs=1)
    assert svid.certificate.not_valid_after_utc <= short_ca.certificate.not_valid_after_utc


def test_each_svid_has_a_new_key_and_serial(authority) -> None:  # type: ignore[no-untyped-def]
    one, two = issue(authority), issue(authority)
    assert one.serial_number != two.serial_number
    assert one.key_der() != two.key_der()


def jwt(authority, audience=("orders",), ttl: float = 300, now: float = NOW):  # type: ignore[no-untyped-def]
    return issue_jwt_svid(ID, audience, key=authority.jwt_key, kid=authority.jwt_kid,
                          alg=authority.jwt_algorithm, ttl=ttl, now=now)


def keys_of(*authorities):  # type: ignore[no-untyped-def]
    from authz_server.workload.bundle import TrustBundle

    out = {}
    for a in authorities:
        domain = a.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)[0][len("spiffe://"):]
        out[domain] = TrustBundle(domain, (a.certificate,), ((a.jwt_kid, a.jwt_key.public_key()),)).jwt_keys()
    return out


def test_jwt_svid_claims_and_header(authority) -> None:  # type: ignore[no-untyped-def]
    svid = jwt(authority, audience=("orders", "payments"))
    head, body, _ = svid.token.split(".")
    header = json.loads(b64url_decode(head))
    claims = json.loads(b64url_decode(body))
    assert header == {"alg": "ES256", "kid": authority.jwt_kid, "typ": "JWT"}
    assert claims["sub"] == ID and claims["aud"] == ["orders", "payments"]
    assert claims["exp"] == int(NOW + 300) and claims["iat"] == int(NOW)


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_jwt_svid_validates_here_and_in_pyspiffe(algorithm: str) -> None:
    now = time.time()  # py-spiffe checks expiry against the real clock
    authority = create_authority("example.org", ttl=86400, jwt_algorithm=algorithm, now=now)
    svid = jwt(authority, now=now)
    validated = validate_jwt_svid(svid.token, "orders", keys_of(authority), now=now + 10)
    assert validated.spiffe_id == ID and validated.trust_domain == "example.org"
    assert validated.claims["aud"] == ["orders"]
    # py-spiffe, with the JWT bundle as the Workload API serves it
    from authz_server.workload.bundle import TrustBundle

    bundle = TrustBundle("example.org", (authority.certificate,), ((authority.jwt_kid, authority.jwt_key.public_key()),))
    theirs = JwtBundle.parse(TrustDomain("example.org"), json.dumps(bundle.jwks()).encode())
    parsed = JwtSvid.parse_and_validate(svid.token, theirs, {"orders"})
    assert str(parsed.spiffe_id) == ID


def test_jwt_svid_refusals(authority, other_authority) -> None:  # type: ignore[no-untyped-def]
    keys = keys_of(authority)
    token = jwt(authority).token
    cases = {
        "wrong_audience": lambda: validate_jwt_svid(token, "payments", keys, now=NOW),
        "expired_token": lambda: validate_jwt_svid(token, "orders", keys, now=NOW + 300 + 31),
        "untrusted_trust_domain": lambda: validate_jwt_svid(token, "orders", keys_of(other_authority), now=NOW),
        "missing_audience": lambda: validate_jwt_svid(token, "", keys, now=NOW),
        "malformed_token": lambda: validate_jwt_svid("not.a.jwt", "orders", keys, now=NOW),
    }
    for code, call in cases.items():
        with pytest.raises(SvidError) as caught:
            call()
        assert caught.value.code == code, (code, caught.value)


def forge(authority, header: dict, claims: dict) -> str:  # type: ignore[no-untyped-def]
    signing_input = f"{b64url_encode(json_compact(header))}.{b64url_encode(json_compact(claims))}"
    signature = sign(authority.jwt_algorithm, authority.jwt_key, signing_input.encode())
    return f"{signing_input}.{b64url_encode(signature)}"


def test_a_domain_key_cannot_sign_for_another_domain(authority, other_authority) -> None:  # type: ignore[no-untyped-def]
    # evil.org's key, a token claiming an example.org subject, both key sets known to the validator
    keys = keys_of(authority, other_authority)
    claims = {"sub": ID, "aud": ["orders"], "exp": int(NOW + 60)}
    token = forge(other_authority, {"alg": "ES256", "kid": other_authority.jwt_kid}, claims)
    with pytest.raises(SvidError) as caught:
        validate_jwt_svid(token, "orders", keys, now=NOW)
    assert caught.value.code == "unknown_kid"


@pytest.mark.parametrize(("header", "claims", "code"), [
    ({"alg": "ES256", "typ": "at+jwt"}, {"sub": ID, "aud": "orders", "exp": NOW + 60}, "wrong_typ"),
    ({"alg": "ES256"}, {"sub": ID, "aud": "orders"}, "missing_claim"),
    ({"alg": "ES256"}, {"sub": ID, "exp": NOW + 60}, "missing_claim"),
    ({"alg": "ES256"}, {"sub": "spiffe://example.org", "aud": "orders", "exp": NOW + 60}, "invalid_claim"),
    ({"alg": "ES256"}, {"sub": "orders", "aud": "orders", "exp": NOW + 60}, "invalid_claim"),
    ({"alg": "ES256"}, {"aud": "orders", "exp": NOW + 60}, "missing_claim"),
    ({"alg": "ES256"}, {"sub": ID, "aud": "orders", "exp": "later"}, "invalid_claim"),
    ({"alg": "ES256"}, {"sub": ID, "aud": "orders", "exp": NOW + 60, "nbf": NOW + 3600}, "token_not_yet_valid"),
])
def test_claims_and_header_checks(authority, header: dict, claims: dict, code: str) -> None:  # type: ignore[no-untyped-def]
    token = forge(authority, {**header, "kid": authority.jwt_kid}, claims)
    with pytest.raises(SvidError) as caught:
        validate_jwt_svid(token, "orders", keys_of(authority), now=NOW)
    assert caught.value.code == code


def test_alg_none_and_tampering_are_refused(authority) -> None:  # type: ignore[no-untyped-def]
    keys = keys_of(authority)
    token = jwt(authority).token
    head, body, sig = token.split(".")
    none = f"{b64url_encode(json_compact({'alg': 'none', 'kid': authority.jwt_kid}))}.{body}."
    with pytest.raises(SvidError) as caught:
        validate_jwt_svid(none, "orders", keys, now=NOW)
    assert caught.value.code == "alg_not_allowed"
    claims = json.loads(b64url_decode(body))
    claims["aud"] = ["payments"]
    tampered = f"{head}.{b64url_encode(json_compact(claims))}.{sig}"
    with pytest.raises(SvidError) as caught:
        validate_jwt_svid(tampered, "payments", keys, now=NOW)
    assert caught.value.code == "bad_signature"
