"""Two real Envoy sidecars in mTLS with SVIDs from our SDS, across several SVID rotations, and
federation decided at the TLS layer.

* A (spiffe://example.org/a): plain-HTTP listener → cluster to B over mTLS; its certificate is
  SDS ``spiffe://example.org/a``, B's is validated by SDS ``ALL`` (Envoy's SPIFFE validator)
  plus a URI SAN matcher for B's exact ID.
* B (spiffe://example.org/b): listener requiring client certificates (SDS cert + ``ALL``),
  forwarding the client certificate's hash and URI in ``x-forwarded-client-cert`` to an echo
  upstream, so the test sees which certificate each request came with.
* X hosts two more outbound identities towards B: spiffe://partner.org/p (a federated domain,
  accepted) and spiffe://evil.org/e (a domain example.org does not federate with: refused by B's
  TLS handshake; evil.org itself trusts example.org, so the refusal is B's, not X's).

The identity server runs as the real CLI (``authz-server identity serve``) with svid_ttl 20s,
so every SVID is replaced every 10 s while traffic runs; a few seconds in, SIGUSR2 rotates every
CA as well (the new CA is in every bundle 5 s before it signs).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from authz_server.mesh.envoy import EnvoyProcess, start_envoy
from authz_server.mesh.processes import Supervisor, free_port, tcp_ready, unix_ready

pytestmark = pytest.mark.e2e

TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

SVID_TTL = 20  # seconds: a new SVID every 10 s
A_ID, B_ID = "spiffe://example.org/a", "spiffe://example.org/b"
PARTNER_ID, EVIL_ID = "spiffe://partner.org/p", "spiffe://evil.org/e"


def sds(name: str, cluster: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}]}}}


def sds_cluster(name: str, socket: str) -> dict[str, Any]:
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": socket}}}}]}]},
    }


def http_listener(name: str, cluster: str, *, transport: dict[str, Any] | None = None,
                  hcm_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    hcm = {"@type": HCM, "stat_prefix": name, "http_filters": [ROUTER],
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
           **(hcm_extra or {})}
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if transport is not None:
        chain["transport_socket"] = transport
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [chain]}


def mtls_cluster(name: str, address: str, *, own_id: str, peer_id: str, sds_name: str) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    return {
        "name": name, "type": "STATIC", "connect_timeout": "2s",
        # A new connection (and TLS handshake) every 10 requests, so rotations are exercised by
        # fresh handshakes all the time, not just by one long-lived connection.
        "typed_extension_protocol_options": {HTTP_OPTIONS: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
            "common_http_protocol_options": {"max_requests_per_connection": 10},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": f"{TLS}.UpstreamTlsContext",
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [sds(own_id, sds_name)],
                "combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": peer_id}}]},
                    "validation_context_sds_secret_config": sds("ALL", sds_name),
                },
            },
        }},
    }


def b_config(socket: str, upstream: str) -> dict[str, Any]:
    host, port = upstream.rsplit(":", 1)
    inbound_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"{TLS}.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds(B_ID, "sds")],
            "validation_context_sds_secret_config": sds("ALL", "sds"),
        },
    }}
    return {"node": {"id": "b", "cluster": "b"}, "static_resources": {
        "listeners": [http_listener("inbound", "upstream", transport=inbound_tls, hcm_extra={
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"uri": True, "cert": True}})],
        "clusters": [sds_cluster("sds", socket), {
            "name": "upstream", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}]}]}}],
    }}


def a_config(socket: str, b_address: str) -> dict[str, Any]:
    return {"node": {"id": "a", "cluster": "a"}, "static_resources": {
        "listeners": [http_listener("outbound", "to_b"),
                      http_listener("outbound_wrong_peer", "to_b_wrong_peer")],
        "clusters": [sds_cluster("sds", socket),
                     mtls_cluster("to_b", b_address, own_id=A_ID, peer_id=B_ID, sds_name="sds"),
                     mtls_cluster("to_b_wrong_peer", b_address, own_id=A_ID, peer_id="spiffe://example.org/not-b",
                                  sds_name="sds")],
    }}


def x_config(partner_socket: str, evil_socket: str, b_address: str) -> dict[str, Any]:
    return {"node": {"id": "x", "cluster": "x"}, "static_resources": {
        "listeners": [http_listener("as_partner", "partner_to_b"), http_listener("as_evil", "evil_to_b")],
        "clusters": [sds_cluster("sds_partner", partner_socket), sds_cluster("sds_evil", evil_socket),
                     mtls_cluster("partner_to_b", b_address, own_id=PARTNER_ID, peer_id=B_ID, sds_name="sds_partner"),
                     mtls_cluster("evil_to_b", b_address, own_id=EVIL_ID, peer_id=B_ID, sds_name="sds_evil")],
    }}


def get(conn: http.client.HTTPConnection, path: str = "/") -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def xfcc_of(body: bytes) -> dict[str, str]:
    headers = json.loads(body)["headers"]
    value = next(v for k, v in (headers.items() if isinstance(headers, dict) else headers)
                 if k.lower() == "x-forwarded-client-cert")
    return {k: v.strip('"') for k, v in (part.split("=", 1) for part in value.split(";"))}


def issuing_ca(xfcc: dict[str, str]) -> bytes:
    """The authority key identifier of the client certificate B received."""
    cert = x509.load_pem_x509_certificate(urllib.parse.unquote(xfcc["Cert"]).encode())
    return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""


def served_cert_serials(envoy: EnvoyProcess) -> set[str]:
    with urllib.request.urlopen(envoy.admin_url + "/certs", timeout=2) as resp:  # noqa: S310 - loopback admin
        certs = json.loads(resp.read())["certificates"]
    return {c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])}


def stat(envoy: EnvoyProcess, pattern: str) -> int:
    return sum(v for k, v in envoy.stats().items() if re.fullmatch(pattern, k))


@pytest.fixture
def mesh(tmp_path: Path, supervisor: Supervisor) -> dict[str, Any]:
    run = tmp_path / "run"
    sockets = {name: str(run / f"{name}.sock") for name in ("a", "b", "p", "e")}
    config = {
        "state_dir": str(tmp_path / "state"), "svid_ttl": f"{SVID_TTL}s", "ca_ttl": "1h", "ca_publish_ahead": "5s",
        "ready_file": str(tmp_path / "identity.ready"),
        "trust_domains": [{"name": "example.org", "federates_with": ["partner.org"]},
                          {"name": "partner.org", "federates_with": ["example.org"]},
                          {"name": "evil.org", "federates_with": ["example.org"]}],
        "workloads": [{"name": "a", "spiffe_id": A_ID, "socket": sockets["a"]},
                      {"name": "b", "spiffe_id": B_ID, "socket": sockets["b"]},
                      {"name": "p", "spiffe_id": PARTNER_ID, "socket": sockets["p"]},
                      {"name": "e", "spiffe_id": EVIL_ID, "socket": sockets["e"]}],
    }
    config_path = tmp_path / "identity.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ready = tmp_path / "identity.ready"
    identity = supervisor.start("identity", [sys.executable, "-m", "authz_server.cli", "identity", "serve",
                                             "--config", str(config_path)], ready=ready.exists, timeout=30)
    assert all(unix_ready(s)() for s in sockets.values())
    upstream_port = free_port()
    supervisor.start("upstream", [sys.executable, "-m", "authz_server.mesh.upstream", "--addr",
                                  f"127.0.0.1:{upstream_port}", "--name", "b"],
                     ready=tcp_ready("127.0.0.1", upstream_port))
    b = start_envoy(supervisor, "envoy_b", b_config(sockets["b"], f"127.0.0.1:{upstream_port}"))
    b_address = b.listener_addresses()["inbound"]
    a = start_envoy(supervisor, "envoy_a", a_config(sockets["a"], b_address))
    x = start_envoy(supervisor, "envoy_x", x_config(sockets["p"], sockets["e"], b_address))
    yield {"a": a, "b": b, "x": x, "identity": identity, "run": run}
    supervisor.close()
    assert not run.exists() or not any(run.iterdir()), "the identity server left sockets behind"


def test_traffic_across_svid_and_ca_rotations_has_no_failures(mesh: dict[str, Any]) -> None:
    a: EnvoyProcess = mesh["a"]
    b: EnvoyProcess = mesh["b"]
    port = a.port("outbound")
    b_serials_before = served_cert_serials(b)
    client_hashes: list[str] = []
    client_cas: set[bytes] = set()
    failures: list[str] = []
    requests = 0
    ca_rotated = False
    started = time.monotonic()
    deadline = started + 50
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    # Until A presented four different certificates to B (three rotations), but at least 32 s.
    while time.monotonic() < deadline and (len(set(client_hashes)) < 4 or time.monotonic() - started < 32):
        if not ca_rotated and time.monotonic() - started > 3:
            # SIGUSR2: every trust domain publishes a new CA now, which signs 5 s later (ca_publish_ahead)
            os.kill(mesh["identity"].popen.pid, signal.SIGUSR2)
            ca_rotated = True
        requests += 1
        try:
            status, body = get(conn)
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"request {requests}: {exc!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            continue
        if status != 200:
            failures.append(f"request {requests}: {status} {body[:200]!r}")
            continue
        xfcc = xfcc_of(body)
        assert xfcc["URI"] == A_ID
        if not client_hashes or client_hashes[-1] != xfcc["Hash"]:
            client_hashes.append(xfcc["Hash"])
            client_cas.add(issuing_ca(xfcc))
        time.sleep(0.003)  # pacing, not synchronisation: keeps the loop from monopolising a core
    conn.close()
    elapsed = time.monotonic() - started
    assert failures == [], f"{len(failures)} of {requests} requests failed: {failures[:5]}"
    distinct = set(client_hashes)
    print(f"{requests} requests in {elapsed:.0f}s, 0 failed; B saw {len(distinct)} client certificates "
          f"from {len(client_cas)} CAs")
    assert len(distinct) >= 4, f"B saw only {len(distinct)} client certificates in {elapsed:.0f}s"
    # ... signed by the old CA and by its successor: the CA rotation did not drop a request either
    assert len(client_cas) == 2
    # B's own certificate rotated too (pushed to its listener by SDS).
    assert served_cert_serials(b) - b_serials_before
    # Every rotation reached Envoy as an accepted SDS update, never a rejected one.
    assert stat(a, r"sds\.spiffe_example\.org/a\.update_success") >= 4
    assert stat(a, r"sds\.spiffe_example\.org/a\.update_rejected") == 0
    assert stat(b, r"sds\.spiffe_example\.org/b\.update_rejected") == 0


def test_federated_domain_accepted_unfederated_refused_at_tls(mesh: dict[str, Any]) -> None:
    x: EnvoyProcess = mesh["x"]
    a: EnvoyProcess = mesh["a"]
    b: EnvoyProcess = mesh["b"]

    status, body = get(http.client.HTTPConnection("127.0.0.1", x.port("as_partner"), timeout=5))
    assert status == 200, body
    assert xfcc_of(body)["URI"] == PARTNER_ID

    handshakes_refused = stat(b, r"listener\..*\.ssl\.(fail_verify_error|connection_error)")
    status, body = get(http.client.HTTPConnection("127.0.0.1", x.port("as_evil"), timeout=5))
    assert status == 503, body
    assert b"TLS" in body or b"tls" in body or b"connection failure" in body, body
    assert stat(b, r"listener\..*\.ssl\.(fail_verify_error|connection_error)") > handshakes_refused

    # A's SAN matcher is real: the same B, expected under another ID, is refused by A.
    status, body = get(http.client.HTTPConnection("127.0.0.1", a.port("outbound_wrong_peer"), timeout=5))
    assert status == 503, body
