"""The calling workload, as Envoy's mTLS established it.

Envoy has already verified the peer's chain against its trust bundles; it hands us the
SPIFFE ID (``source.principal``, or ``URI=`` of ``x-forwarded-client-cert``) and, when
configured, the certificate. ``PrincipalVerifier`` accepts the ID if its trust domain is
one we trust and derives the certificate thumbprint, once per certificate (bounded cache),
never per request.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..errors import WorkloadError
from ..facts import Facts


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    spiffe_id: str
    trust_domain: str
    cert_sha256: str = ""  # hex SHA-256 of the certificate's DER
    not_after: float | None = None
    fingerprint: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            blob = f"{self.spiffe_id}\0{self.cert_sha256}".encode()
            object.__setattr__(self, "fingerprint", hashlib.blake2b(blob, digest_size=16).digest())

    def to_input(self) -> dict[str, Any]:
        return {"spiffe_id": self.spiffe_id, "trust_domain": self.trust_domain, "cert_sha256": self.cert_sha256}

    @property
    def x5t_s256(self) -> str:
        """RFC 8705 thumbprint (base64url of the SHA-256 of the DER, no padding)."""
        if not self.cert_sha256:
            return ""
        return base64.urlsafe_b64encode(bytes.fromhex(self.cert_sha256)).rstrip(b"=").decode()


class WorkloadVerifier(Protocol):
    def verify(self, facts: Facts, now: float) -> WorkloadIdentity | None: ...


def split_spiffe_id(text: str) -> tuple[str, str]:
    """``spiffe://td/path`` → (trust domain, path); raises ``WorkloadError`` quoting the input."""
    if not text.startswith("spiffe://"):
        raise WorkloadError(f"not a SPIFFE ID: {text[:100]!r}", code="invalid_spiffe_id")
    rest = text[len("spiffe://"):]
    domain, slash, path = rest.partition("/")
    if not domain or domain != domain.lower() or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789.-_" for c in domain):
        raise WorkloadError(f"invalid trust domain in SPIFFE ID {text[:100]!r}", code="invalid_spiffe_id")
    if slash and (not path or path.endswith("/") or "//" in path or any(s in (".", "..") for s in path.split("/"))):
        raise WorkloadError(f"invalid path in SPIFFE ID {text[:100]!r}", code="invalid_spiffe_id")
    return domain, "/" + path if slash else ""


def der_sha256(certificate: str) -> str:
    """Hex SHA-256 of the DER inside an (URL-encoded) PEM certificate."""
    pem = urllib.parse.unquote(certificate) if "%" in certificate else certificate
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----")
    if begin < 0 or end < 0:
        raise WorkloadError("peer certificate is not PEM", code="invalid_svid")
    body = "".join(pem[begin + 27:end].split())
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:
        raise WorkloadError("peer certificate PEM is not base64", code="invalid_svid") from None
    return hashlib.sha256(der).hexdigest()


class PrincipalVerifier:
    def __init__(self, accept: Callable[[str], bool] | None = None, *, max_entries: int = 10_000) -> None:
        self._accept = accept
        self._cache: OrderedDict[tuple[str, str], WorkloadIdentity] = OrderedDict()
        self.max_entries = max_entries
        self.parses = 0

    def verify(self, facts: Facts, now: float) -> WorkloadIdentity | None:
        principal = facts.source_principal
        if not principal:
            return None
        key = (principal, facts.source_certificate)
        found = self._cache.get(key)
        if found is None:
            found = self._parse(principal, facts.source_certificate)
            self._cache[key] = found
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if self._accept is not None and not self._accept(found.trust_domain):
            raise WorkloadError(f"trust domain {found.trust_domain!r} of {principal} is not trusted",
                                code="untrusted_trust_domain")
        return found

    def _parse(self, principal: str, certificate: str) -> WorkloadIdentity:
        self.parses += 1
        domain, _ = split_spiffe_id(principal)
        return WorkloadIdentity(principal, domain, der_sha256(certificate) if certificate else "")


def accept_trust_domains(domains: list[str] | tuple[str, ...]) -> Callable[[str], bool] | None:
    allowed = frozenset(domains)
    return (lambda domain: domain in allowed) if allowed else None
