"""The calling workload, as Envoy's mTLS established it.

Envoy has already verified the peer's chain against its trust bundles; it hands us the
SPIFFE ID (``source.principal``, or ``URI=`` of ``x-forwarded-client-cert``), when configured
the certificate (``include_peer_certificate``), and, through the sidecar's header mutation,
the TLS version it negotiated (``x-authz-tls-version`` from ``%DOWNSTREAM_TLS_VERSION%``,
overwriting anything the client sent). ``PrincipalVerifier`` turns that into a
``WorkloadIdentity``:

* the SPIFFE ID is parsed strictly and its trust domain must be one we trust (``trust_domains``,
  and, when bundles are configured, one we hold a bundle for);
* the certificate, if forwarded, must be an X.509-SVID for exactly that ID, valid now, and
  (with bundles) chain to its trust domain's authorities — parsed and validated once per
  certificate by ``PeerCertificateCache``, never per request.

A warm request costs one dict lookup keyed by what Envoy sent (principal, certificate text,
TLS version) and a validity-window comparison.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..errors import WorkloadError
from ..facts import Facts
from .spiffe import BundleSet, PeerCertificateCache, SpiffeId, accept_trust_domains, pem_certificates, \
    split_spiffe_id

TLS_VERSION_HEADER = "x-authz-tls-version"
# What Envoy's %DOWNSTREAM_TLS_VERSION% gives ("TLSv1.2", "TLSv1.3"); anything else (a list,
# spaces, a long string) means the header was appended to rather than overwritten: refused.
_TLS_VERSION = re.compile(r"[A-Za-z0-9._-]{1,32}\Z")


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    spiffe_id: str
    trust_domain: str
    cert_sha256: str = ""  # hex SHA-256 of the certificate's DER
    not_after: float | None = None  # the certificate's (and its verified path's) notAfter
    tls_version: str | None = None  # as Envoy negotiated it with the caller, e.g. "TLSv1.3"
    not_before: float | None = field(default=None, compare=False)
    fingerprint: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            blob = f"{self.spiffe_id}\0{self.cert_sha256}\0{self.tls_version or ''}".encode()
            object.__setattr__(self, "fingerprint", hashlib.blake2b(blob, digest_size=16).digest())

    def to_input(self) -> dict[str, Any]:
        return {"spiffe_id": self.spiffe_id, "trust_domain": self.trust_domain, "cert_sha256": self.cert_sha256,
                "tls_version": self.tls_version, "not_after": self.not_after}

    @property
    def x5t_s256(self) -> str:
        """RFC 8705 thumbprint (base64url of the SHA-256 of the DER, no padding)."""
        if not self.cert_sha256:
            return ""
        return base64.urlsafe_b64encode(bytes.fromhex(self.cert_sha256)).rstrip(b"=").decode()


class WorkloadVerifier(Protocol):
    def verify(self, facts: Facts, now: float) -> WorkloadIdentity | None: ...


def der_sha256(certificate: str) -> str:
    """Hex SHA-256 of the DER of the first certificate in an (URL-encoded) PEM text."""
    return hashlib.sha256(pem_certificates(certificate)[0]).hexdigest()


def tls_version_of(value: str | None) -> str | None:
    """The ``x-authz-tls-version`` header's value; None when absent or empty (plain TCP)."""
    if value is None:
        return None
    value = value.strip()
    if not value or value == "-":
        return None
    if not _TLS_VERSION.match(value):
        raise WorkloadError(f"{TLS_VERSION_HEADER} is not one TLS version: Envoy must overwrite "
                            f"the header, not append to it", code="invalid_tls_version")
    return value


class PrincipalVerifier:
    """Implements ``WorkloadVerifier``; ``accept`` judges trust domain names (None: any)."""

    def __init__(self, accept: Callable[[str], bool] | None = None, *,
                 certificates: PeerCertificateCache | None = None, max_entries: int = 10_000) -> None:
        self._accept = accept
        self.certificates = certificates if certificates is not None else PeerCertificateCache(max_entries=max_entries)
        self.max_entries = max_entries
        self._identities: OrderedDict[tuple[str, str, str | None], WorkloadIdentity] = OrderedDict()
        bundles = self.certificates.bundles
        self._bundles_version = bundles.version if bundles is not None else 0

    @property
    def bundles(self) -> BundleSet | None:
        return self.certificates.bundles

    @property
    def parses(self) -> int:
        """Certificates parsed so far (each at most once while it stays cached)."""
        return self.certificates.stats.parses

    def verify(self, facts: Facts, now: float) -> WorkloadIdentity | None:
        principal = facts.source_principal
        if not principal:
            return None
        bundles = self.certificates.bundles
        if bundles is not None and bundles.version != self._bundles_version:
            self._identities.clear()  # judged against bundles that are gone
            self._bundles_version = bundles.version
        key = (principal, facts.source_certificate, facts.headers.get(TLS_VERSION_HEADER))
        found = self._identities.get(key)
        if found is not None:
            not_after = found.not_after
            if not_after is None or (now < not_after and (found.not_before is None or found.not_before <= now)):
                self._identities.move_to_end(key)
                return found
            del self._identities[key]  # outside its validity: the certificate cache says why
        found = self._derive(key, now)
        self._identities[key] = found
        if len(self._identities) > self.max_entries:
            self._identities.popitem(last=False)
        return found

    def _derive(self, key: tuple[str, str, str | None], now: float) -> WorkloadIdentity:
        principal, certificate, tls_header = key
        spiffe_id = SpiffeId.parse(principal)
        domain = spiffe_id.trust_domain.name
        if self._accept is not None and not self._accept(domain):
            raise WorkloadError(f"trust domain {domain!r} of {principal} is not trusted",
                                code="untrusted_trust_domain")
        bundles = self.certificates.bundles
        if bundles is not None and domain not in bundles:
            raise WorkloadError(f"no trust bundle for trust domain {domain!r} of {principal}",
                                code="untrusted_trust_domain")
        tls_version = tls_version_of(tls_header)
        if not certificate:
            return WorkloadIdentity(principal, domain, tls_version=tls_version)
        peer = self.certificates.get(certificate, principal, now)
        return WorkloadIdentity(principal, domain, peer.cert_sha256, peer.not_after, tls_version,
                                not_before=peer.not_before)


__all__ = ["PrincipalVerifier", "TLS_VERSION_HEADER", "WorkloadIdentity", "WorkloadVerifier", "accept_trust_domains",
           "der_sha256", "split_spiffe_id", "tls_version_of"]
