"""One-shot key material for docker-compose.yml, made on first start and kept in named volumes.

Run by the ``bootstrap`` service (the authz-server image: Python + cryptography) as root, so
it can hand each private key to the only user that reads it. Nothing here is committed to the
repository: every ``docker compose up`` on a new machine makes its own keys, and a later
``up`` keeps them (a certificate is re-made only when missing, unreadable or within 30 days
of expiry). ``docker compose down -v`` throws them away with the rest of the state.

``--spire DIR`` (volume ``spire-bootstrap``)
    ``upstream-ca.pem`` / ``upstream-ca.key``  root CA for SPIRE server's ``UpstreamAuthority "disk"``;
                                               also the agent's ``trust_bundle_path`` (no insecure bootstrap)
    ``agent-ca.pem``                           x509pop node-attestation CA (server: ``ca_bundle_path``)
    ``agent.pem`` / ``agent.key``              the agent's x509pop identity, CN ``spire-agent``
``--keycloak DIR`` (volume ``keycloak-tls``: the demo's Web PKI)
    ``ca.pem``                                 trusted by authz-server (``issuers[].ca_file``), by curl, and by
                                               both ends of the SPIFFE federation (bundle endpoints, https_web)
    ``tls.pem`` / ``tls.key``                  Keycloak's HTTPS certificate: keycloak, localhost, 127.0.0.1
    ``spire-bundle.pem`` / ``.key``            SPIRE server's bundle endpoint (spire-server:8443)
    ``partner-bundle.pem`` / ``.key``          the partner.org issuer's bundle endpoint (partner-issuer:8443)

Development PKI for a demo on one Docker host: the CA keys live on the same host as
everything else. A real deployment brings its own node attestation and CA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "example.org"
AGENT_CN = "spire-agent"  # spire/server/server.conf: agent_path_template uses it; spire/entries.json names it
CA_LIFETIME = dt.timedelta(days=5 * 365)
LEAF_LIFETIME = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)

# Who reads each private key (the images' users): spire-server and Keycloak run as 1000,
# the SPIRE agent as root, the authz-server image as 10001.
SPIRE_SERVER_UID = 1000
KEYCLOAK_UID = 1000
AUTHZ_UID = 10001
ROOT_UID = 0
# The SPIFFE bundle endpoints (https_web profile): which host each certificate names, and who reads its key.
BUNDLE_ENDPOINTS = {"spire-bundle": ("spire-server", SPIRE_SERVER_UID), "partner-bundle": ("partner-issuer", AUTHZ_UID)}


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "authz-server demo"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str, *, spiffe_trust_domain: str | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(_name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_LIFETIME)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if spiffe_trust_domain:
        # As SPIRE's own CAs do: a signing certificate names its trust domain (SPIFFE X.509-SVID §4.1).
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{spiffe_trust_domain}")]),
            critical=False)
    return Issued(builder.sign(key, hashes.SHA256()), key)


def make_leaf(ca: Issued, common_name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              server: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + LEAF_LIFETIME)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               # x509pop needs digitalSignature on the agent's certificate (proof of possession).
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, mode: int, owner: int | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, owner, owner)
    os.replace(tmp, path)


def _load(cert_path: Path, key_path: Path | None) -> Issued | None:
    """The pair on disk if it is readable and not about to expire; None means make a new one."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None) if key_path else None
    except (OSError, ValueError):
        return None
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return None
    if key is not None and not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return Issued(cert, key)  # type: ignore[arg-type]


def _store(directory: Path, stem: str, issued: Issued, *, key_owner: int | None, cert_name: str | None = None) -> None:
    _write(directory / (cert_name or f"{stem}.pem"), _pem_cert(issued.cert), mode=0o644, owner=None)
    _write(directory / f"{stem}.key", _pem_key(issued.key), mode=0o600, owner=key_owner)


def spire_material(directory: Path, *, chown: bool) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    upstream = _load(directory / "upstream-ca.pem", directory / "upstream-ca.key")
    if upstream is None:
        upstream = make_ca(f"{TRUST_DOMAIN} upstream CA (SPIRE)", spiffe_trust_domain=TRUST_DOMAIN)
        _store(directory, "upstream-ca", upstream, key_owner=SPIRE_SERVER_UID if chown else None)
        made.append("upstream-ca")
    agent_ca = _load(directory / "agent-ca.pem", directory / "agent-ca.key")
    if agent_ca is None:
        agent_ca = make_ca("SPIRE agent x509pop CA")
        _store(directory, "agent-ca", agent_ca, key_owner=ROOT_UID if chown else None)
        made.append("agent-ca")
    agent = _load(directory / "agent.pem", directory / "agent.key")
    if agent is None or agent.cert.issuer != agent_ca.cert.subject or "agent-ca" in made:
        agent = make_leaf(agent_ca, AGENT_CN)
        _store(directory, "agent", agent, key_owner=ROOT_UID if chown else None)
        made.append("agent")
    return made


def keycloak_material(directory: Path, *, chown: bool) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    ca = _load(directory / "ca.pem", directory / "ca.key")
    if ca is None:
        ca = make_ca("Keycloak demo CA")
        _store(directory, "ca", ca, key_owner=ROOT_UID if chown else None)
        made.append("keycloak-ca")
    leaf = _load(directory / "tls.pem", directory / "tls.key")
    if leaf is None or "keycloak-ca" in made:
        leaf = make_leaf(ca, "keycloak", dns=("keycloak", "localhost"), ips=("127.0.0.1", "::1"), server=True)
        _store(directory, "tls", leaf, key_owner=KEYCLOAK_UID if chown else None)
        made.append("keycloak-tls")
    for stem, (host, owner) in BUNDLE_ENDPOINTS.items():
        endpoint = _load(directory / f"{stem}.pem", directory / f"{stem}.key")
        if endpoint is None or "keycloak-ca" in made:
            endpoint = make_leaf(ca, host, dns=(host,), server=True)
            _store(directory, stem, endpoint, key_owner=owner if chown else None)
            made.append(stem)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spire", type=Path, help="folder for SPIRE's upstream CA and x509pop material")
    parser.add_argument("--keycloak", type=Path, help="folder for Keycloak's CA and HTTPS certificate")
    parser.add_argument("--no-chown", action="store_true", help="leave owners alone (tests, non-root runs)")
    args = parser.parse_args(argv)
    if args.spire is None and args.keycloak is None:
        parser.error("give --spire and/or --keycloak")
    chown = not args.no_chown
    if chown and os.geteuid() != 0:
        parser.error("run as root (the compose service sets user: 0) or pass --no-chown")
    made: list[str] = []
    if args.spire is not None:
        made += spire_material(args.spire, chown=chown)
    if args.keycloak is not None:
        made += keycloak_material(args.keycloak, chown=chown)
    print("bootstrap: made " + ", ".join(made) if made else "bootstrap: key material present and current, kept",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
