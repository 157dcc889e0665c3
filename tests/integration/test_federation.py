"""Federation as SPIFFE defines it: two dev issuers, two processes, two trust domains, each
learning the other's bundle only from its SPIFFE bundle endpoint (https_web profile), and a
workload of one trust domain verified by the other."""

from __future__ import annotations

import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient

from authz_server.identity.spiffe import BundleSet, PeerCertificateCache
from authz_server.mesh.processes import Supervisor, free_port, wait_until
from authz_server.workload.bundle import TrustBundle, parse_spiffe_bundle
from authz_server.workload.bundle_endpoint import BundleFetcher, serve_bundle_endpoint
from authz_server.workload.config import BundleEndpointConfig, IdentityConfig, RemotePartner
from authz_server.workload.ca import CertificateAuthority
from authz_server.errors import ConfigError, WorkloadError
from tests.support.pki import ScratchCA

FRONTEND, PAYMENTS = "spiffe://example.org/frontend", "spiffe://partner.org/payments"


def _issuer(folder: Path, web: ScratchCA, *, own: str, partner: str, port: int, partner_port: int,
            workload: tuple[str, str]) -> dict[str, Any]:
    cert, key, ca = web.write(folder / "tls", "endpoint", web.issue_server())
    return {
        "state_dir": str(folder / "state"), "ready_file": str(folder / "ready.json"), "svid_ttl": "1h",
        "bundle_refresh_hint": "2s", "ca_publish_ahead": "30s",
        "bundle_endpoint": {"addr": f"127.0.0.1:{port}", "cert_file": str(cert), "key_file": str(key)},
        "trust_domains": [{"name": own, "federates_with": [{
            "trust_domain": partner, "bundle_endpoint_url": f"https://localhost:{partner_port}/{partner}",
            "profile": "https_web", "ca_file": str(ca)}]}],
        "workloads": [{"name": workload[0], "spiffe_id": workload[1], "socket": str(folder / f"{workload[0]}.sock")}],
    }


def _start(supervisor: Supervisor, name: str, config: dict[str, Any], folder: Path) -> Any:
    path = folder / "identity.yaml"
    path.write_text(yaml.safe_dump(config))
    return supervisor.start(name, [sys.executable, "-m", "authz_server.cli", "identity", "serve", "--config",
                                   str(path)], ready=(folder / "ready.json").exists, timeout=60)


def _bundle(socket: Path, trust_domain: str) -> Any:
    with WorkloadApiClient(f"unix:{socket}", default_timeout=10) as client:
        return client.fetch_x509_bundles().get_bundle_for_trust_domain(TrustDomain(trust_domain))


def test_two_issuers_learn_each_others_bundles_over_their_endpoints(supervisor: Supervisor, tmp_path: Path) -> None:
    web = ScratchCA.create("web-pki")  # the endpoints' Web PKI, not either trust domain's CA
    a, b = tmp_path / "a", tmp_path / "b"
    port_a, port_b = free_port(), free_port()
    _start(supervisor, "issuer-a", _issuer(a, web, own="example.org", partner="partner.org", port=port_a,
                                           partner_port=port_b, workload=("frontend", FRONTEND)), a)
    issuer_b = _start(supervisor, "issuer-b", _issuer(b, web, own="partner.org", partner="example.org",
                                                      port=port_b, partner_port=port_a,
                                                      workload=("payments", PAYMENTS)), b)
    frontend, payments = a / "frontend.sock", b / "payments.sock"

    # The bundle endpoint serves each issuer's own trust domain, as a SPIFFE bundle.
    web_pki = ssl.create_default_context(cafile=str(a / "tls" / "ca.pem"))
    answer = httpx.get(f"https://localhost:{port_b}/partner.org", verify=web_pki)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    document = answer.json()
    assert document["spiffe_refresh_hint"] == 2 and "spiffe_sequence" in document
    assert {k["use"] for k in document["keys"]} == {"x509-svid", "jwt-svid"}
    assert httpx.get(f"https://localhost:{port_b}/example.org", verify=web_pki).status_code == 404

    # Each workload gets its partner's bundle (fetched by its own issuer) next to its own ...
    wait_until(lambda: _bundle(frontend, "partner.org") is not None and _bundle(payments, "example.org") is not None,
               timeout=30, interval=0.1, what="each issuer to fetch the other's bundle")
    assert _bundle(frontend, "partner.org").x509_authorities == _bundle(payments, "partner.org").x509_authorities
    assert not (a / "state" / "partner.org").exists(), "issuer a must not hold partner.org's CA"

    # ... so a workload of partner.org is verified in example.org: its certificate chains to the
    # bundle frontend was served, as authz-server checks a peer certificate Envoy forwards.
    with WorkloadApiClient(f"unix:{payments}", default_timeout=10) as client:
        svid = client.fetch_x509_svid()
        token = client.fetch_jwt_svid({"spiffe://example.org/frontend"}).token
    with WorkloadApiClient(f"unix:{frontend}", default_timeout=10) as client:
        bundles = BundleSet()
        bundles.update_from_x509_context(client.fetch_x509_context())
        validated = client.validate_jwt_svid(token, "spiffe://example.org/frontend")
    assert str(validated.spiffe_id) == PAYMENTS
    pem = "".join(cert.public_bytes(serialization.Encoding.PEM).decode() for cert in svid.cert_chain)
    peer = PeerCertificateCache(bundles=bundles).get(pem, PAYMENTS, time.time())
    assert peer.spiffe_id == PAYMENTS
    with pytest.raises(WorkloadError):  # and only because of the federated bundle
        PeerCertificateCache(bundles=BundleSet([bundles.get("example.org")])).get(pem, PAYMENTS, time.time())

    # A new CA on partner.org's side reaches example.org's workloads after the refresh hint.
    before = len(_bundle(frontend, "partner.org").x509_authorities)
    started = time.monotonic()
    issuer_b.popen.send_signal(signal.SIGUSR2)
    wait_until(lambda: len(_bundle(frontend, "partner.org").x509_authorities) == before + 1, timeout=30,
               interval=0.1, what="partner.org's new CA to reach example.org")
    print(f"partner.org's new CA reached example.org's workload after {time.monotonic() - started:.1f}s "
          "(refresh hint 2s)")


# -- the two ends, in process -----------------------------------------------------------------

@pytest.fixture
def served(tmp_path: Path) -> tuple[ScratchCA, Path, Path, TrustBundle]:
    web = ScratchCA.create("web-pki")
    cert, key, ca_file = web.write(tmp_path / "tls", "endpoint", web.issue_server())
    ca = CertificateAuthority("partner.org", tmp_path / "ca", ca_ttl=86400, publish_ahead=30, jwt_algorithm="ES256",
                              now=time.time())
    ca.advance(time.time())
    return web, cert, key, ca.bundle(refresh_hint=7)


async def test_fetcher_reads_the_served_bundle_and_refuses_what_it_cannot_trust(served, tmp_path: Path) -> None:
    web, cert, key, bundle = served
    documents: dict[str, bytes | None] = {"partner.org": bundle.to_json()}

    def lookup(name: str) -> TrustBundle | None:
        text = documents.get(name)
        return None if text is None else parse_spiffe_bundle(name, text)

    server, bound = await serve_bundle_endpoint(BundleEndpointConfig("127.0.0.1:0", str(cert), str(key)), lookup)
    port = bound.rpartition(":")[2]
    try:
        ca_file = str(tmp_path / "tls" / "ca.pem")
        good = BundleFetcher(RemotePartner("partner.org", f"https://localhost:{port}/partner.org", ca_file=ca_file),
                             lambda b: None, default_refresh=60)
        fetched = await good.fetch()
        assert fetched.to_spiffe() == bundle.to_spiffe() and fetched.refresh_hint == 7 and good._next(fetched) == 7

        stranger = ScratchCA.create("other-web")
        stranger.write(tmp_path / "other", "x", stranger.issue_server())
        for partner, message in (
                (RemotePartner("partner.org", f"https://localhost:{port}/nowhere.org", ca_file=ca_file), "404"),
                (RemotePartner("partner.org", f"https://localhost:{port}/partner.org",
                               ca_file=str(tmp_path / "other" / "ca.pem")), "cannot fetch"),  # not its Web PKI
                (RemotePartner("partner.org", f"https://localhost:{free_port()}/partner.org", ca_file=ca_file),
                 "cannot fetch")):
            fetcher = BundleFetcher(partner, lambda b: None, default_refresh=60)
            with pytest.raises(Exception) as refused:
                await fetcher.fetch()
            assert message in str(refused.value)
            await fetcher.close()
        documents["partner.org"] = None
        with pytest.raises(Exception):
            await good.fetch()
        await good.close()
    finally:
        server.close()


def test_federation_config_errors_name_the_key(tmp_path: Path) -> None:
    def config(partner: Any, **extra: Any) -> dict[str, Any]:
        return {"trust_domains": [{"name": "example.org", "federates_with": [partner]}],
                "workloads": [{"name": "w", "spiffe_id": "spiffe://example.org/w", "socket": "w.sock"}], **extra}

    remote = {"trust_domain": "partner.org", "bundle_endpoint_url": "https://issuer.partner.org/partner.org",
              "profile": "https_web"}
    parsed = IdentityConfig.from_mapping(config(remote), base_dir=tmp_path)
    assert parsed.trust_domain("example.org").federates_with == ("partner.org",)
    assert parsed.remote_partners == (RemotePartner("partner.org", remote["bundle_endpoint_url"]),)
    for partner, key, message in (
            ({**remote, "profile": "https_spiffe"}, "federates_with[0].profile", "not a profile"),
            ({**remote, "bundle_endpoint_url": "http://x/partner.org"}, "bundle_endpoint_url", "https://"),
            ({**remote, "trust_domain": "example.org"}, "trust_domain", ""),
            ({**remote, "ca_file": "missing.pem"}, "ca_file", "cannot read"),
            ({**remote, "colour": "blue"}, "colour", "unknown key")):
        with pytest.raises(ConfigError) as bad:
            IdentityConfig.from_mapping(config(partner), base_dir=tmp_path)
        assert key in (bad.value.key or "") and message in bad.value.message, bad.value
    for endpoint, key in (({"addr": "127.0.0.1:8443"}, "bundle_endpoint.cert_file"),
                          ({"addr": "nowhere", "cert_file": "x", "key_file": "y"}, "bundle_endpoint.addr")):
        with pytest.raises(ConfigError) as bad:
            IdentityConfig.from_mapping({**config(remote), "bundle_endpoint": endpoint}, base_dir=tmp_path)
        assert bad.value.key == key
