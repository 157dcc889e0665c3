"""The issuer's state over time: what each workload sees (federation), SVID rotation at
half-life, CA rotation reaching every workload that trusts the domain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authz_server.workload import IdentityConfig, Issuer, SvidError, parse_spiffe_bundle

NOW = 1_700_000_000.0  # a fixed clock: every check here takes `now`


def config(tmp_path: Path, **overrides: object) -> IdentityConfig:
    data = {
        "state_dir": "state", "svid_ttl": "60s", "ca_ttl": "1h", "ca_publish_ahead": "10s",
        "trust_domains": [{"name": "example.org", "federates_with": ["partner.org"]},
                          {"name": "partner.org", "federates_with": ["example.org"]},
                          {"name": "evil.org"}],
        "workloads": [{"name": "a", "spiffe_id": "spiffe://example.org/a", "socket": "a.sock"},
                      {"name": "b", "spiffe_id": "spiffe://example.org/b", "socket": "b.sock"},
                      {"name": "p", "spiffe_id": "spiffe://partner.org/p", "socket": "p.sock"},
                      {"name": "e", "spiffe_id": "spiffe://evil.org/e", "socket": "e.sock"}],
        **overrides,
    }
    return IdentityConfig.from_dict(data, base_dir=tmp_path)


def test_each_workload_sees_its_domain_and_its_federation(tmp_path: Path) -> None:
    issuer = Issuer(config(tmp_path), now=NOW)
    a = issuer.snapshot("a")
    assert a.svid.spiffe_id == "spiffe://example.org/a"
    assert a.bundle.trust_domain == "example.org"
    assert set(a.federated) == {"partner.org"}
    assert set(a.bundles()) == {"example.org", "partner.org"}
    assert set(issuer.snapshot("e").bundles()) == {"evil.org"}
    # the federated bundle is the partner's SPIFFE bundle document, as published
    document = (tmp_path / "state" / "bundles" / "partner.org.json").read_bytes()
    assert a.federated["partner.org"].x509_der() == parse_spiffe_bundle("partner.org", document).x509_der()
    assert json.loads(document)["keys"][0]["use"] == "x509-svid"


def test_svids_rotate_at_half_life(tmp_path: Path) -> None:
    issuer = Issuer(config(tmp_path), now=NOW)
    before = {n: issuer.snapshot(n) for n in ("a", "b", "p", "e")}
    assert issuer.next_event() == pytest.approx(NOW + 30)
    assert not issuer.advance(NOW + 29)
    changes = issuer.advance(NOW + 30)
    assert changes.workloads == {"a", "b", "p", "e"} and not changes.trust_domains
    for name, old in before.items():
        new = issuer.snapshot(name)
        assert new.version == old.version + 1
        assert new.svid.serial_number != old.svid.serial_number
        assert new.svid.issued_at == NOW + 30
    assert issuer.next_event() == pytest.approx(NOW + 60)


def test_forced_rotation_of_one_workload(tmp_path: Path) -> None:
    issuer = Issuer(config(tmp_path), now=NOW)
    serial = issuer.snapshot("b").svid.serial_number
    changes = issuer.rotate_svids(NOW + 1, ["a"])
    assert changes.workloads == {"a"}
    assert issuer.snapshot("b").svid.serial_number == serial
    with pytest.raises(KeyError):
        issuer.rotate_svids(NOW, ["nobody"])


def test_ca_rotation_reaches_every_workload_that_trusts_the_domain(tmp_path: Path) -> None:
    issuer = Issuer(config(tmp_path), now=NOW)
    old_authority = issuer.certificate_authority("partner.org").active
    changes = issuer.rotate_ca("partner.org", NOW + 1)
    # partner.org's own workload, and example.org's (which federate with partner.org), not evil.org's
    assert changes.workloads == {"a", "b", "p"} and changes.trust_domains == {"partner.org"}
    assert len(issuer.snapshot("a").federated["partner.org"].x509_authorities) == 2
    assert issuer.snapshot("p").svid.authority_id == old_authority.id  # not signing yet
    changes = issuer.advance(NOW + 1 + 10)
    assert "p" in changes.workloads
    p = issuer.snapshot("p")
    assert p.svid.authority_id != old_authority.id
    p.svid.certificate.verify_directly_issued_by(issuer.certificate_authority("partner.org").active.certificate)
    # both CAs are still trusted while SVIDs of the old one may be in use
    assert len(p.bundle.x509_authorities) == 2
    with pytest.raises(KeyError):
        issuer.rotate_ca("nowhere.org", NOW)


def test_jwt_svids_validate_within_the_federation_only(tmp_path: Path) -> None:
    issuer = Issuer(config(tmp_path), now=NOW)
    from_partner = issuer.issue_jwt_svid("p", ["orders"], now=NOW).token
    from_evil = issuer.issue_jwt_svid("e", ["orders"], now=NOW).token
    assert issuer.validate_jwt_svid("a", from_partner, "orders", now=NOW).spiffe_id == "spiffe://partner.org/p"
    with pytest.raises(SvidError) as caught:
        issuer.validate_jwt_svid("a", from_evil, "orders", now=NOW)
    assert caught.value.code == "untrusted_trust_domain"
    # a JWT-SVID signed before a CA rotation still validates (the old key stays in the bundle)
    own = issuer.issue_jwt_svid("a", ["orders"], now=NOW).token
    issuer.rotate_ca("example.org", NOW + 1, activate_after=0)
    assert issuer.validate_jwt_svid("b", own, "orders", now=NOW + 2).spiffe_id == "spiffe://example.org/a"


def test_restart_keeps_the_cas(tmp_path: Path) -> None:
    first = Issuer(config(tmp_path), now=NOW)
    second = Issuer(config(tmp_path), now=NOW + 5)
    for domain in ("example.org", "partner.org", "evil.org"):
        assert first.bundle(domain).x509_der() == second.bundle(domain).x509_der()
    second.snapshot("a").svid.certificate.verify_directly_issued_by(first.bundle("example.org").x509_authorities[0])


def test_public_api() -> None:
    import authz_server.workload as workload

    assert sorted(workload.__all__) == sorted([
        "ALL_BUNDLES_NAME", "BundleError", "DEFAULT_BUNDLE_NAME", "DEFAULT_SVID_NAME", "IdentityConfig",
        "IdentityServer", "IdentityServerThread", "Issuer", "JwtSvid", "SvidError", "TrustBundle", "TrustDomainConfig",
        "ValidatedJwtSvid", "WorkloadConfig", "WorkloadSnapshot", "X509Svid", "parse_spiffe_bundle"])
    assert all(hasattr(workload, name) for name in workload.__all__)
