"""SDS resource names (SPIRE's) and the xDS stream protocol, as pure state: versions, nonces,
ACK, NACK, stale nonces, and pushes only when a secret really changed."""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from authz_server.workload import IdentityConfig, Issuer
from authz_server.workload.sds import SECRET_TYPE_URL, SdsError, SecretStream, build_secrets
from tests.support.sds import secrets_of

NOW = 1_700_000_000.0  # a fixed clock: every check here takes `now`
A = "spiffe://example.org/a"


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    return Issuer(IdentityConfig.from_dict({
        "state_dir": "state", "svid_ttl": "60s",
        "trust_domains": [{"name": "example.org", "federates_with": ["partner.org"]}, {"name": "partner.org"},
                          {"name": "evil.org"}],
        "workloads": [{"name": "a", "spiffe_id": A, "socket": "a.sock"}],
    }, base_dir=tmp_path), now=NOW)


def validator_domains(secret: secret_pb2.Secret) -> dict[str, list[x509.Certificate]]:
    custom = secret.validation_context.custom_validator_config
    assert custom.name == "envoy.tls.cert_validator.spiffe"
    config = spiffe_pb2.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config)
    return {td.name: x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes) for td in config.trust_domains}


def request(*names: str, version: str = "", nonce: str = "", error: str = "",
            node: base_pb2.Node | None = None) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE_URL, resource_names=list(names), version_info=version,
                                         response_nonce=nonce)
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    if node is not None:
        req.node.CopyFrom(node)
    return req


def test_spire_resource_names(issuer: Issuer) -> None:
    snapshot = issuer.snapshot("a")
    names = (A, "default", "ROOTCA", "spiffe://example.org", "partner.org", "ALL")
    secrets = {s.name: s for s in build_secrets(names, snapshot)}
    assert list(secrets) == list(names)
    for name in (A, "default"):
        chain = x509.load_pem_x509_certificates(secrets[name].tls_certificate.certificate_chain.inline_bytes)
        assert chain[0].serial_number == snapshot.svid.serial_number
        assert b"PRIVATE KEY" in secrets[name].tls_certificate.private_key.inline_bytes
    example_ca = issuer.bundle("example.org").x509_authorities
    assert validator_domains(secrets["ROOTCA"]) == {"example.org": list(example_ca)}
    assert validator_domains(secrets["spiffe://example.org"]) == {"example.org": list(example_ca)}
    assert set(validator_domains(secrets["partner.org"])) == {"partner.org"}
    # ALL: own and federated trust domains, never one it does not federate with
    assert validator_domains(secrets["ALL"]) == {
        "example.org": list(example_ca), "partner.org": list(issuer.bundle("partner.org").x509_authorities)}


def test_names_the_workload_may_not_have_are_refused(issuer: Issuer) -> None:
    for name in ("spiffe://example.org/b", "evil.org", "spiffe://evil.org", "spiffe://example.org/a/../b", "nope"):
        with pytest.raises(SdsError) as caught:
            build_secrets((A, name), issuer.snapshot("a"))
        assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert "not authorized" in caught.value.message and name in caught.value.message


def test_wildcard_request_gets_everything(issuer: Issuer) -> None:
    names = [s.name for s in build_secrets((), issuer.snapshot("a"))]
    assert names == ["spiffe://example.org", "spiffe://partner.org", A]


def test_node_metadata_can_ask_for_plain_trusted_ca(issuer: Issuer) -> None:
    node = base_pb2.Node(id="x", metadata=struct_pb2.Struct(fields={
        "disable_spiffe_cert_validation": struct_pb2.Value(bool_value=True)}))
    (secret,) = build_secrets(("ROOTCA",), issuer.snapshot("a"), node=node)
    assert not secret.validation_context.HasField("custom_validator_config")
    certs = x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)
    assert certs == list(issuer.bundle("example.org").x509_authorities)
    with pytest.raises(SdsError) as caught:
        build_secrets(("ALL",), issuer.snapshot("a"), node=node)
    assert caught.value.status == grpc.StatusCode.FAILED_PRECONDITION


def stream(issuer: Issuer) -> SecretStream:
    counter = itertools.count(1)
    return SecretStream(issuer.snapshot("a"), workload="a", nonce=lambda: f"n{next(counter)}")


def test_ack_nack_and_stale_nonces(issuer: Issuer) -> None:
    s = stream(issuer)
    first = s.on_request(request(A))
    assert first is not None and (first.version_info, first.nonce) == ("1", "n1")
    assert first.type_url == SECRET_TYPE_URL
    # ACK: nothing to send
    assert s.on_request(request(A, version="1", nonce="n1")) is None
    assert s.counters.acks == 1
    # a request answering an older response is stale: ignored even if it asks for other names
    assert s.on_request(request(A, "ALL", version="0", nonce="n0")) is None
    assert s.counters.stale == 1 and s.names == (A,)
    # NACK: logged and counted, the same content is not sent again
    assert s.on_request(request(A, version="0", nonce="n1", error="bad certificate")) is None
    assert (s.counters.nacks, s.last_error) == (1, "bad certificate")
    # new names on the current nonce: answered at once with every requested secret
    second = s.on_request(request(A, "ALL", version="1", nonce="n1"))
    assert second is not None and second.version_info == "2" and set(secrets_of(second)) == {A, "ALL"}


def test_rotation_pushes_only_what_changed(issuer: Issuer) -> None:
    s = stream(issuer)
    assert s.on_update(issuer.snapshot("a")) is None  # nothing requested yet
    s.on_request(request("ALL"))
    issuer.rotate_svids(NOW + 1)
    assert s.on_update(issuer.snapshot("a")) is None  # ALL does not carry the SVID
    issuer.rotate_ca("partner.org", NOW + 2)
    pushed = s.on_update(issuer.snapshot("a"))
    assert pushed is not None and len(validator_domains(secrets_of(pushed)["ALL"])["partner.org"]) == 2

    cert_stream = stream(issuer)
    cert_stream.on_request(request(A))
    old_serial = issuer.snapshot("a").svid.serial_number
    issuer.rotate_svids(NOW + 3)
    pushed = cert_stream.on_update(issuer.snapshot("a"))
    assert pushed is not None and pushed.version_info == "2" and pushed.nonce == "n2"
    chain = secrets_of(pushed)[A].tls_certificate.certificate_chain.inline_bytes
    assert x509.load_pem_x509_certificate(chain).serial_number != old_serial


def test_unsubscribing_from_everything_stops_pushes(issuer: Issuer) -> None:
    s = stream(issuer)
    s.on_request(request(A))
    assert s.on_request(request(version="1", nonce="n1")) is None
    issuer.rotate_svids(NOW + 1)
    assert s.on_update(issuer.snapshot("a")) is None


def test_wrong_type_and_too_many_names(issuer: Issuer) -> None:
    s = stream(issuer)
    with pytest.raises(SdsError) as caught:
        s.on_request(discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"))
    assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(SdsError):
        s.on_request(request(*[f"n{i}" for i in range(100)]))
