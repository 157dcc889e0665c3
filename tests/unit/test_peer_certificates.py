"""The certificate Envoy forwards, checked once per certificate (X509-SVID §2, §3.1, §5.2).

``PeerCertificateCache`` is what ``PrincipalVerifier`` consults on a miss; both are tested
here, and the decision pipeline once, to show that the TLS version a caller negotiated takes
part in cached decisions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.parse
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe.bundle.x509_bundle.x509_bundle import X509Bundle
from spiffe.bundle.x509_bundle.x509_bundle_set import X509BundleSet
from spiffe.spiffe_id.spiffe_id import TrustDomain as PySpiffeTrustDomain
from spiffe.svid.x509_svid import X509Svid
from spiffe.workloadapi.x509_context import X509Context

from authz_server.decision import Pipeline
from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.errors import WorkloadError
from authz_server.facts import Facts
from authz_server.identity.resolver import IdentityService, SessionSettings
from authz_server.identity.spiffe import (BundleError, BundleSet, PeerCertificateCache, TrustBundle,
                                          verify_chain_signatures, verify_chain_webpki)
from authz_server.identity.workloads import TLS_VERSION_HEADER, PrincipalVerifier, WorkloadIdentity, tls_version_of
from authz_server.policy.loader import PolicyRuntime
from tests.support.authz import write_policy
from tests.support.pki import BACKDATE, Leaf, ScratchCA

FRONTEND = "spiffe://example.org/frontend"
ORDERS = "spiffe://example.org/orders"
VERIFIERS = [pytest.param(verify_chain_webpki, id="webpki"), pytest.param(verify_chain_signatures, id="signatures")]


def envoy_text(*pems: bytes) -> str:
    """``source.certificate`` as Envoy sends it: URL-encoded PEM."""
    return urllib.parse.quote(b"".join(pems).decode())


def not_after(leaf: Leaf) -> float:
    return x509.load_pem_x509_certificate(leaf.cert_pem).not_valid_after_utc.timestamp()


@pytest.fixture(scope="module")
def ca() -> ScratchCA:
    return ScratchCA.create("example.org")


@pytest.fixture(scope="module")
def now(ca: ScratchCA) -> float:
    """When the module's CA was made (X.509 times have whole seconds), not when tests were collected."""
    return ca.cert.not_valid_before_utc.timestamp() + BACKDATE.total_seconds()


@pytest.fixture(scope="module")
def frontend(ca: ScratchCA) -> Leaf:
    return ca.issue(FRONTEND)


def bundles_of(*cas: tuple[str, ScratchCA]) -> BundleSet:
    return BundleSet(TrustBundle.parse_pem(domain, authority.pem) for domain, authority in cas)


def refused(cache: PeerCertificateCache, text: str, principal: str, now: float) -> WorkloadError:
    with pytest.raises(WorkloadError) as caught:
        cache.get(text, principal, now)
    return caught.value


# -- what is accepted

@pytest.mark.parametrize("verify_chain", VERIFIERS)
def test_an_svid_of_the_reported_principal_is_accepted(ca: ScratchCA, frontend: Leaf, verify_chain: Any, now: float) -> None:
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", ca)), verify_chain=verify_chain)
    peer = cache.get(envoy_text(frontend.cert_pem), FRONTEND, now)
    assert peer.spiffe_id == FRONTEND and peer.trust_domain == "example.org" and peer.chain_verified
    assert peer.cert_sha256 == hashlib.sha256(frontend.der).hexdigest()
    assert peer.not_after == not_after(frontend)  # the leaf expires before its CA


def test_without_bundles_the_leaf_is_still_checked_but_not_its_chain(frontend: Leaf, now: float) -> None:
    cache = PeerCertificateCache()
    peer = cache.get(envoy_text(frontend.cert_pem), FRONTEND, now)
    assert peer.spiffe_id == FRONTEND and not peer.chain_verified


# -- what is refused, and with which code

def test_a_certificate_for_another_workload_is_a_mismatch(ca: ScratchCA, now: float) -> None:
    orders = ca.issue(ORDERS)
    error = refused(PeerCertificateCache(bundles=bundles_of(("example.org", ca))), envoy_text(orders.cert_pem), FRONTEND, now)
    assert error.code == "svid_mismatch"
    assert ORDERS in error.message and FRONTEND in error.message


def test_two_uri_sans_are_refused(ca: ScratchCA, now: float) -> None:
    # §2 "Validators encountering an SVID containing more than one URI SAN MUST reject the SVID."
    two = ca.issue(FRONTEND, extra_uris=("spiffe://example.org/admin",))
    error = refused(PeerCertificateCache(), envoy_text(two.cert_pem), FRONTEND, now)
    assert error.code == "invalid_svid" and "2 URI SANs" in error.message


def test_no_uri_san_and_a_non_spiffe_uri_are_refused(ca: ScratchCA, now: float) -> None:
    https = ca.issue("https://example.org/frontend")
    error = refused(PeerCertificateCache(), envoy_text(https.cert_pem), "https://example.org/frontend", now)
    assert error.code == "invalid_svid" and "scheme" in error.message


def test_a_ca_certificate_is_not_a_workload(ca: ScratchCA, now: float) -> None:
    # §5.2 "the validator MUST ensure that the CA field in the basic constraints extension is set to false"
    signing = ca.issue(FRONTEND, ca=True)
    error = refused(PeerCertificateCache(), envoy_text(signing.cert_pem), FRONTEND, now)
    assert error.code == "invalid_svid" and "CA certificate" in error.message
    # "... and that keyCertSign and cRLSign are not set in the key usage extension"
    key_signer = ca.issue(FRONTEND, key_cert_sign=True)
    error = refused(PeerCertificateCache(), envoy_text(key_signer.cert_pem), FRONTEND, now)
    assert error.code == "invalid_svid" and "keyCertSign" in error.message


def test_a_leaf_naming_only_a_trust_domain_is_refused(ca: ScratchCA, now: float) -> None:
    # §3.1 "Leaf certificate SPIFFE IDs MUST have a non-root path component."
    root_id = ca.issue("spiffe://example.org")
    error = refused(PeerCertificateCache(), envoy_text(root_id.cert_pem), "spiffe://example.org", now)
    assert error.code == "invalid_svid"


def test_expired_and_not_yet_valid(ca: ScratchCA, now: float) -> None:
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", ca)))
    old = ca.issue(FRONTEND, not_before=now - 7200, not_after=now - 3600)
    error = refused(cache, envoy_text(old.cert_pem), FRONTEND, now)
    assert error.code == "svid_expired" and FRONTEND in error.message
    early = ca.issue(FRONTEND, not_before=now + 600, not_after=now + 3600)
    assert refused(cache, envoy_text(early.cert_pem), FRONTEND, now).code == "svid_not_yet_valid"
    # Valid once its time has come, and judged without parsing it again.
    assert cache.get(envoy_text(early.cert_pem), FRONTEND, now + 601).spiffe_id == FRONTEND
    assert cache.stats.parses == 2


def test_an_entry_is_evicted_at_not_after_and_the_expired_certificate_never_parsed_again(ca: ScratchCA, now: float) -> None:
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", ca)))
    leaf = ca.issue(FRONTEND, not_before=now - 60, not_after=now + 60)
    text = envoy_text(leaf.cert_pem)
    assert cache.get(text, FRONTEND, now + 59.999).spiffe_id == FRONTEND
    assert len(cache) == 1
    for _ in range(3):
        assert refused(cache, text, FRONTEND, now + 60).code == "svid_expired"  # notAfter itself is past
    assert len(cache) == 0 and cache.stats.expired == 1
    assert cache.stats.parses == 1


def test_a_trust_domain_without_a_bundle_is_untrusted(now: float) -> None:
    partner = ScratchCA.create("partner.org")
    leaf = partner.issue("spiffe://partner.org/auditor")
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", ScratchCA.create("example.org"))))
    error = refused(cache, envoy_text(leaf.cert_pem), "spiffe://partner.org/auditor", now)
    assert error.code == "untrusted_trust_domain" and "partner.org" in error.message


@pytest.mark.parametrize("verify_chain", VERIFIERS)
def test_a_certificate_from_another_ca_is_refused(ca: ScratchCA, verify_chain: Any, now: float) -> None:
    # Same trust domain name, same CA subject: only the signature tells them apart.
    impostor = ScratchCA.create("example.org")
    forged = impostor.issue(FRONTEND)
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", ca)), verify_chain=verify_chain)
    assert refused(cache, envoy_text(forged.cert_pem), FRONTEND, now).code == "untrusted_svid"


@pytest.mark.parametrize("verify_chain", VERIFIERS)
def test_a_certificate_signed_by_another_trust_domains_ca_is_refused(verify_chain: Any, now: float) -> None:
    # §3.1 of SPIFFE-ID: trust is rooted in the ID's own trust domain, even when both are trusted.
    example, partner = ScratchCA.create("example.org"), ScratchCA.create("partner.org")
    cross = partner.issue(FRONTEND)
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", example), ("partner.org", partner)),
                                 verify_chain=verify_chain)
    assert refused(cache, envoy_text(cross.cert_pem), FRONTEND, now).code == "untrusted_svid"


@pytest.mark.parametrize("verify_chain", VERIFIERS)
def test_an_intermediate_sent_with_the_leaf_completes_the_path(ca: ScratchCA, verify_chain: Any, now: float) -> None:
    intermediate = ca.intermediate()
    leaf = intermediate.issue(FRONTEND)
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", ca)), verify_chain=verify_chain)
    peer = cache.get(envoy_text(leaf.cert_pem, intermediate.pem), FRONTEND, now)
    assert peer.chain_verified and peer.cert_sha256 == hashlib.sha256(leaf.der).hexdigest()
    assert refused(cache, envoy_text(leaf.cert_pem), FRONTEND, now).code == "untrusted_svid"  # the leaf alone


def test_garbage_is_refused_and_judged_once(ca: ScratchCA, now: float) -> None:
    cache = PeerCertificateCache()
    for text in ("not a certificate", "-----BEGIN%20CERTIFICATE-----%0A%25%25%25%0A-----END%20CERTIFICATE-----",
                 envoy_text(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")):
        for _ in range(3):
            assert refused(cache, text, FRONTEND, now).code == "invalid_svid"
    assert cache.stats.parses == 1  # only the base64 one reached the X.509 parser, once
    huge = "%41" * 30_000
    assert refused(cache, huge, FRONTEND, now).code == "invalid_svid"
    assert huge not in cache._by_text  # not kept: an attacker's bytes are no cache key


# -- once per certificate, bounded

def test_each_certificate_is_parsed_once_whatever_its_encoding(ca: ScratchCA, frontend: Leaf, now: float) -> None:
    cache = PeerCertificateCache(bundles=bundles_of(("example.org", ca)))
    text = envoy_text(frontend.cert_pem)
    for _ in range(100):
        cache.get(text, FRONTEND, now)
    assert cache.stats.parses == 1 and cache.stats.hits == 99
    # The same certificate as plain PEM (XFCC) or with other line breaks: found by its digest.
    cache.get(frontend.cert_pem.decode(), FRONTEND, now)
    assert cache.stats.parses == 1 and cache.stats.digest_hits == 1
    # A refusal about the principal is not a property of the certificate: no new parse either.
    assert refused(cache, text, ORDERS, now).code == "svid_mismatch"
    assert cache.stats.parses == 1


def test_the_cache_is_bounded_and_keeps_what_is_used(ca: ScratchCA, now: float) -> None:
    cache = PeerCertificateCache(max_entries=3)
    leaves = [ca.issue(f"spiffe://example.org/w{i}") for i in range(5)]
    texts = [envoy_text(leaf.cert_pem) for leaf in leaves]
    for i, text in enumerate(texts[:3]):
        cache.get(text, f"spiffe://example.org/w{i}", now)
    cache.get(texts[0], "spiffe://example.org/w0", now)  # w0 is the most recently used now
    for i in (3, 4):
        cache.get(texts[i], f"spiffe://example.org/w{i}", now)
    assert len(cache) == 3 and len(cache._by_text) == 3 and cache.stats.evictions >= 2
    parses = cache.stats.parses
    cache.get(texts[0], "spiffe://example.org/w0", now)  # kept
    assert cache.stats.parses == parses
    cache.get(texts[1], "spiffe://example.org/w1", now)  # evicted: parsed again
    assert cache.stats.parses == parses + 1


def test_new_bundles_empty_the_cache(ca: ScratchCA, frontend: Leaf, now: float) -> None:
    bundles = bundles_of(("example.org", ca))
    cache = PeerCertificateCache(bundles=bundles)
    text = envoy_text(frontend.cert_pem)
    cache.get(text, FRONTEND, now)
    bundles.put(TrustBundle.parse_pem("example.org", ca.pem))  # the same content: nothing changes
    cache.get(text, FRONTEND, now)
    assert cache.stats.parses == 1
    successor = ScratchCA.create("example.org")
    bundles.put(TrustBundle("example.org", (successor.cert,)))  # the old CA is gone from the bundle
    assert refused(cache, text, FRONTEND, now).code == "untrusted_svid"
    assert cache.stats.parses == 2


# -- bundles

def spiffe_bundle_document(*cas: ScratchCA) -> dict[str, Any]:
    keys: list[dict[str, Any]] = []
    for authority in cas:
        numbers = authority.cert.public_key().public_numbers()  # type: ignore[union-attr]
        keys.append({"kty": "EC", "crv": "P-256", "use": "x509-svid",
                     "x": base64.urlsafe_b64encode(numbers.x.to_bytes(32, "big")).rstrip(b"=").decode(),
                     "y": base64.urlsafe_b64encode(numbers.y.to_bytes(32, "big")).rstrip(b"=").decode(),
                     "x5c": [base64.b64encode(authority.cert.public_bytes(serialization.Encoding.DER)).decode()]})
    keys.append({"kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "jwt-1", "x": keys[0]["x"], "y": keys[0]["y"]})
    keys.append({"kty": "EC", "crv": "P-256", "use": "x509-svid", "x": keys[0]["x"], "y": keys[0]["y"]})  # no x5c
    return {"keys": keys, "spiffe_sequence": 3, "spiffe_refresh_hint": 300}


def test_spiffe_bundle_documents_give_their_x509_authorities(ca: ScratchCA, tmp_path: Any) -> None:
    # X509-SVID §6.2: x509-svid entries without x5c are ignored; jwt-svid keys are no X.509 authority.
    successor = ScratchCA.create("example.org")
    document = spiffe_bundle_document(ca, successor)
    bundle = TrustBundle.parse_spiffe("example.org", json.dumps(document))
    assert bundle.x509_authorities == (ca.cert, successor.cert)
    path = tmp_path / "example.org.json"
    path.write_text(json.dumps(document))
    assert TrustBundle.load("example.org", path).x509_authorities == (ca.cert, successor.cert)
    pem = tmp_path / "example.org.pem"
    pem.write_bytes(ca.pem + successor.pem)
    assert TrustBundle.load("example.org", pem).x509_authorities == (ca.cert, successor.cert)


@pytest.mark.parametrize("document", [
    "[]", "{}", '{"keys": 1}', '{"keys": [], "keys": []}',
    '{"keys": [{"use": "x509-svid", "x5c": ["not base64!"]}]}',
    '{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}',
])
def test_unusable_bundle_documents_are_refused(document: str, now: float) -> None:
    with pytest.raises(BundleError) as caught:
        TrustBundle.parse_spiffe("example.org", document)
    assert caught.value.code == "invalid_bundle" and "example.org" in caught.value.message


def test_bundles_follow_the_workload_api(ca: ScratchCA, frontend: Leaf, now: float) -> None:
    """py-spiffe's ``X509Source`` pushes contexts; the set keeps up and the caches notice."""
    partner = ScratchCA.create("partner.org")

    own = ca.issue("spiffe://example.org/authz-server")
    svid = X509Svid.parse(own.cert_pem, own.key_pem)

    def context(*entries: tuple[str, ScratchCA]) -> X509Context:
        return X509Context([svid], X509BundleSet.of([X509Bundle(PySpiffeTrustDomain(domain), {authority.cert})
                                                  for domain, authority in entries]))

    class Source:
        def __init__(self) -> None:
            self.current = context(("example.org", ca))
            self.callbacks: list[Any] = []

        def get_x509_context(self) -> X509Context:
            return self.current

        def subscribe_for_updates(self, callback: Any) -> None:
            self.callbacks.append(callback)

        def push(self, new: X509Context) -> None:
            self.current = new
            for callback in self.callbacks:
                callback()

    source = Source()
    bundles = BundleSet()
    verifier = PrincipalVerifier(certificates=PeerCertificateCache(bundles=bundles))
    bundles.follow(source)
    assert bundles.trust_domains == ("example.org",)
    auditor = partner.issue("spiffe://partner.org/auditor")
    assert verifier.verify(facts(FRONTEND, frontend), now) is not None
    with pytest.raises(WorkloadError, match="partner.org") as caught:
        verifier.verify(facts("spiffe://partner.org/auditor", auditor), now)
    assert caught.value.code == "untrusted_trust_domain"
    version = bundles.version
    source.push(context(("example.org", ca)))  # our own SVID rotated: same bundles
    assert bundles.version == version
    source.push(context(("example.org", ca), ("partner.org", partner)))  # federation with partner.org
    assert bundles.version == version + 1
    assert verifier.verify(facts("spiffe://partner.org/auditor", auditor), now).trust_domain == "partner.org"


# -- the verifier: workload identity per request

def facts(principal: str, leaf: Leaf | None = None, tls_version: str | None = None) -> Facts:
    headers = {TLS_VERSION_HEADER: tls_version} if tls_version is not None else {}
    return Facts(method="GET", path="/", headers=headers, source_principal=principal,
                 source_certificate=envoy_text(leaf.cert_pem) if leaf else "")


def test_workload_identity_carries_the_tls_version(ca: ScratchCA, frontend: Leaf, now: float) -> None:
    verifier = PrincipalVerifier(certificates=PeerCertificateCache(bundles=bundles_of(("example.org", ca))))
    tls13 = verifier.verify(facts(FRONTEND, frontend, "TLSv1.3"), now)
    assert tls13 is not None and tls13.to_input() == {
        "spiffe_id": FRONTEND, "trust_domain": "example.org", "cert_sha256": hashlib.sha256(frontend.der).hexdigest(),
        "tls_version": "TLSv1.3", "not_after": not_after(frontend)}
    tls12 = verifier.verify(facts(FRONTEND, frontend, "TLSv1.2"), now)
    assert tls12 is not None and tls12.tls_version == "TLSv1.2"
    assert tls12 != tls13 and tls12.fingerprint != tls13.fingerprint  # decisions cached for one don't serve the other
    absent = verifier.verify(facts(FRONTEND, frontend), now)
    assert absent is not None and absent.tls_version is None and absent.to_input()["tls_version"] is None
    assert verifier.verify(facts(FRONTEND, frontend, "TLSv1.3"), now) is tls13  # warm: the same object
    assert verifier.parses == 1


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), ("-", None), ("TLSv1.3", "TLSv1.3"), (" TLSv1.2 ", "TLSv1.2"), ("TLSv1", "TLSv1"),
])
def test_tls_version_values(value: str | None, expected: str | None) -> None:
    assert tls_version_of(value) == expected


@pytest.mark.parametrize("value", ["TLSv1.2,TLSv1.3", "TLSv1.3, TLSv1.0", "TLS v1.3", "x" * 64])
def test_an_appended_or_odd_tls_version_header_is_refused(value: str, now: float) -> None:
    # Envoy overwrites the header; a list means a client's value survived next to Envoy's.
    with pytest.raises(WorkloadError) as caught:
        PrincipalVerifier().verify(facts(FRONTEND, tls_version=value), now)
    assert caught.value.code == "invalid_tls_version"


def test_untrusted_trust_domains_are_refused_before_any_parsing(now: float) -> None:
    from authz_server.identity.spiffe import accept_trust_domains

    verifier = PrincipalVerifier(accept_trust_domains(["example.org"]))
    evil = ScratchCA.create("evil.org").issue("spiffe://evil.org/frontend")
    with pytest.raises(WorkloadError) as caught:
        verifier.verify(facts("spiffe://evil.org/frontend", evil), now)
    assert caught.value.code == "untrusted_trust_domain" and verifier.parses == 0
    with pytest.raises(WorkloadError) as caught:
        verifier.verify(facts("spiffe://Example.org/frontend"), now)
    assert caught.value.code == "invalid_spiffe_id"


def test_a_warm_identity_still_expires_at_not_after(ca: ScratchCA, now: float) -> None:
    leaf = ca.issue(FRONTEND, not_before=now - 60, not_after=now + 60)
    verifier = PrincipalVerifier()
    identity = verifier.verify(facts(FRONTEND, leaf), now)
    assert identity is not None and identity.not_after == now + 60
    assert verifier.verify(facts(FRONTEND, leaf), now + 59) is identity
    with pytest.raises(WorkloadError) as caught:
        verifier.verify(facts(FRONTEND, leaf), now + 60)
    assert caught.value.code == "svid_expired"


def test_without_a_certificate_the_principal_alone_is_the_identity(now: float) -> None:
    identity = PrincipalVerifier().verify(facts(FRONTEND, tls_version="TLSv1.3"), now)
    assert identity == WorkloadIdentity(FRONTEND, "example.org", tls_version="TLSv1.3")
    assert identity.to_input()["cert_sha256"] == "" and identity.to_input()["not_after"] is None


async def test_cached_decisions_respect_the_tls_version(tmp_path: Any, ca: ScratchCA, frontend: Leaf, now: float) -> None:
    write_policy(tmp_path, 'package envoy.authz\nimport rego.v1\ndefault allow := false\n'
                           'allow if input.identity.workload.tls_version == "TLSv1.3"\n')
    runtime = PolicyRuntime(str(tmp_path))
    runtime.load()
    identity = IdentityService(SessionSettings(enabled=False), workloads=PrincipalVerifier(
        certificates=PeerCertificateCache(bundles=bundles_of(("example.org", ca)))))
    pipeline = Pipeline(runtime, identity=identity)

    def check(version: str) -> Facts:
        return facts_from_check_request(check_request_from_json({"attributes": {
            "source": {"principal": FRONTEND, "certificate": envoy_text(frontend.cert_pem)},
            "request": {"http": {"method": "GET", "path": "/orders", "headers": {TLS_VERSION_HEADER: version}}}}}))

    assert (await pipeline.decide(check("TLSv1.3"), now=now)).allowed
    assert (await pipeline.decide(check("TLSv1.3"), now=now)).cached
    refused_12 = await pipeline.decide(check("TLSv1.2"), now=now)
    assert not refused_12.allowed and not refused_12.cached
    runtime.close()
