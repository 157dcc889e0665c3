"""A throw-away CA and SPIFFE-style certificates for tests (the dev issuer makes real SVIDs)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


# Certificates start an hour back: a test module may fix its "now" when it is imported, and
# in the whole suite that can be minutes before its fixtures issue the certificates.
BACKDATE = dt.timedelta(hours=1)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Leaf:
    cert_pem: bytes
    key_pem: bytes
    der: bytes


@dataclass
class ScratchCA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "example.org") -> "ScratchCA":
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - BACKDATE)
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{name}")]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def intermediate(self, name: str | None = None) -> "ScratchCA":
        """A CA signed by this one (same trust domain unless ``name`` says otherwise)."""
        key = ec.generate_private_key(ec.SECP256R1())
        domain = name or self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(domain)),
                             x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(hours=12))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{domain}")]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return ScratchCA(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, spiffe_id: str, *, dns: tuple[str, ...] = ("localhost",), hours: float = 1,
              extra_uris: tuple[str, ...] = (), ca: bool = False, key_cert_sign: bool = False,
              not_before: float | None = None, not_after: float | None = None) -> Leaf:
        """A leaf for ``spiffe_id``; the keywords after ``hours`` make the broken certificates
        the validator must refuse (more URI SANs, a CA, signing key usage, any validity window)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        names += [x509.UniformResourceIdentifier(u) for u in extra_uris]
        names += [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        start = _utc(not_before) if not_before is not None else now - BACKDATE
        end = _utc(not_after) if not_after is not None else now + dt.timedelta(hours=hours)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, key_cert_sign, False, False, False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(self.key, hashes.SHA256()))
        return Leaf(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key),
                    cert.public_bytes(serialization.Encoding.DER))

    def issue_server(self, dns: tuple[str, ...] = ("localhost",), *, hours: float = 1) -> Leaf:
        """A Web PKI style server certificate (DNS names and 127.0.0.1, no SPIFFE ID)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - BACKDATE)
                .not_valid_after(now + dt.timedelta(hours=hours))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(self.key, hashes.SHA256()))
        return Leaf(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key),
                    cert.public_bytes(serialization.Encoding.DER))

    def write(self, folder: Path, name: str, leaf: Leaf) -> tuple[Path, Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        cert, key, ca = folder / f"{name}.pem", folder / f"{name}.key", folder / "ca.pem"
        cert.write_bytes(leaf.cert_pem)
        key.write_bytes(leaf.key_pem)
        ca.write_bytes(self.pem)
        return cert, key, ca
