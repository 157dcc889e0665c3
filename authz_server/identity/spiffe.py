"""SPIFFE for the authz server: IDs, trust domains, X.509 trust bundles, peer X.509-SVIDs.

* ``SpiffeId`` / ``TrustDomain``: value objects, parsed strictly per the SPIFFE ID standard
  (§2.1 "The host part of the authority MUST be lowercase" and "MUST contain only letters,
  numbers, dots, dashes, and underscores ([a-z0-9.-_])"; §2.2 no percent-encoding, no empty or
  ``.``/``..`` segments, no trailing ``/``, segments of ``[a-zA-Z0-9.-_]``; no query, fragment,
  port or userinfo). Only the canonical spelling is accepted, as go-spiffe does: policies and
  session bindings compare IDs as strings, so two spellings of one ID must not exist.
* ``TrustBundle`` / ``BundleSet``: the X.509 authorities of each trusted trust domain (own and
  federated), from PEM files, SPIFFE bundle documents (a JWK Set with ``use: "x509-svid"``
  keys, X509-SVID §6.2), or pushed by the Workload API (``BundleSet.follow``). A set is
  swapped atomically and carries a ``version`` that changes only when its content does.
* ``PeerCertificateCache``: the certificate Envoy forwards (``include_peer_certificate``),
  parsed and validated once per certificate, then looked up by the exact text Envoy sent.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import re
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ..errors import WorkloadError
from .encoding import jwk_set_document

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048  # §2.3: implementations MUST support 2048 bytes and SHOULD NOT make longer ones
MAX_TRUST_DOMAIN_BYTES = 255  # §2.3: RFC 3986's limit for the host
_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = _TRUST_DOMAIN_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

X509_SVID_USE = "x509-svid"
MAX_BUNDLE_KEYS = 100
# What Envoy forwards is untrusted input until parsed: bounded in size and chain length.
MAX_CERTIFICATE_TEXT = 64 * 1024
MAX_CHAIN_LENGTH = 8
_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----([^-]*)-----END CERTIFICATE-----")


class BundleError(WorkloadError):
    """A trust bundle that cannot be used; the message names the trust domain and the key."""

    default_code = "invalid_bundle"


# -- IDs and trust domains

def _invalid_id(text: str, why: str) -> WorkloadError:
    # Not quoted: the text can come from a request (a principal, x-forwarded-client-cert).
    return WorkloadError(f"invalid SPIFFE ID of {len(text)} characters: {why}", code="invalid_spiffe_id")


def _check_trust_domain(name: str, text: str) -> None:
    if not name:
        raise _invalid_id(text, "trust domain is missing")
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise _invalid_id(text, f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN_CHARS.issuperset(name):
        raise _invalid_id(text, "trust domain characters are limited to lowercase letters, numbers, dots, dashes, "
                                "and underscores")


def _check_path(path: str, text: str) -> None:
    segments = path[1:].split("/")
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if not segment:
            raise _invalid_id(text, "path cannot have a trailing slash" if index == last
                              else "path cannot contain empty segments")
        if segment == "." or segment == "..":
            raise _invalid_id(text, "path cannot contain dot segments")
        if not _PATH_CHARS.issuperset(segment):
            raise _invalid_id(text, "path segment characters are limited to letters, numbers, dots, dashes, "
                                    "and underscores")


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name, e.g. ``example.org``."""

    name: str

    @classmethod
    def parse(cls, text: str) -> "TrustDomain":
        """A bare name (``example.org``) or a SPIFFE ID (``spiffe://example.org/...``)."""
        if not isinstance(text, str):
            raise _invalid_id("", f"not a string but a {type(text).__name__}")
        if text.startswith(SCHEME):
            return SpiffeId.parse(text).trust_domain
        _check_trust_domain(text, text)
        return cls(text)

    @property
    def id(self) -> str:
        """The trust domain's own SPIFFE ID (its signing authorities carry it)."""
        return SCHEME + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """``spiffe://<trust domain><path>``; ``path`` is ``""`` or starts with ``/``."""

    trust_domain: TrustDomain
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> "SpiffeId":
        """Raises ``WorkloadError`` (``invalid_spiffe_id``) saying why."""
        if not isinstance(text, str) or not text:
            raise _invalid_id(str(text or ""), "cannot be empty")
        if len(text) > MAX_ID_BYTES:
            raise _invalid_id(text, f"longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME):
            raise _invalid_id(text, "scheme is missing or invalid")
        domain, slash, rest = text[len(SCHEME):].partition("/")
        _check_trust_domain(domain, text)
        path = "/" + rest if slash else ""
        if path:
            _check_path(path, text)
        return cls(TrustDomain(domain), path)

    def member_of(self, trust_domain: TrustDomain | str) -> bool:
        return self.trust_domain.name == (trust_domain.name if isinstance(trust_domain, TrustDomain)
                                          else trust_domain)

    def __str__(self) -> str:
        return SCHEME + self.trust_domain.name + self.path


def split_spiffe_id(text: str) -> tuple[str, str]:
    """``spiffe://td/path`` → (trust domain, path); raises ``WorkloadError`` quoting the input."""
    parsed = SpiffeId.parse(text)
    return parsed.trust_domain.name, parsed.path


def accept_trust_domains(domains: Iterable[str]) -> Callable[[str], bool] | None:
    """A predicate admitting members of ``domains`` (trust domain names); None admits any."""
    allowed = frozenset(domains)
    return (lambda domain: domain in allowed) if allowed else None


# -- trust bundles

def _der_digest(certificate: x509.Certificate) -> bytes:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The X.509 authorities (CA certificates) that sign one trust domain's SVIDs."""

    trust_domain: str
    x509_authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        TrustDomain.parse(self.trust_domain)

    @property
    def digests(self) -> frozenset[bytes]:
        return frozenset(_der_digest(c) for c in self.x509_authorities)

    @classmethod
    def parse_pem(cls, trust_domain: str, data: bytes | str) -> "TrustBundle":
        raw = data.encode() if isinstance(data, str) else data
        try:
            authorities = tuple(x509.load_pem_x509_certificates(raw))
        except ValueError as exc:
            raise BundleError(f"bundle for {trust_domain}: not PEM certificates ({exc})") from None
        return cls(trust_domain, authorities)

    @classmethod
    def parse_spiffe(cls, trust_domain: str, document: bytes | str | Mapping[str, Any]) -> "TrustBundle":
        """A SPIFFE bundle document (SPIFFE Trust Domain and Bundle §4). X509-SVID §6.2: "For
        every JWK entry in the bundle with the ``use`` parameter set to ``x509-svid``, check that
        the ``x5c`` parameter is set and has at least one value. If ``x5c`` is not set, or is
        empty, then the entry MUST be ignored"; only its first value counts. Other keys
        (``jwt-svid``, unknown ``use``) are not X.509 authorities and are skipped."""
        where = f"bundle for {trust_domain}"
        try:
            _, keys = jwk_set_document(document)
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
        if len(keys) > MAX_BUNDLE_KEYS:
            raise BundleError(f"{where}: {len(keys)} keys is more than {MAX_BUNDLE_KEYS}")
        authorities: list[x509.Certificate] = []
        for index, entry in enumerate(keys):
            if not isinstance(entry, Mapping) or entry.get("use") != X509_SVID_USE:
                continue
            chain = entry.get("x5c")
            if not isinstance(chain, list) or not chain:
                continue
            first = chain[0]
            try:
                if not isinstance(first, str):
                    raise ValueError("not a string")
                authorities.append(x509.load_der_x509_certificate(base64.b64decode(first, validate=True)))
            except (ValueError, binascii.Error) as exc:
                raise BundleError(f"{where}: keys[{index}].x5c[0] is not a base64 DER certificate: {exc}") from None
        return cls(trust_domain, tuple(authorities))

    @classmethod
    def load(cls, trust_domain: str, path: str | Path) -> "TrustBundle":
        """A file holding PEM certificates or a SPIFFE bundle document (JSON)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BundleError(f"bundle for {trust_domain}: cannot read {path}: {exc.strerror}") from None
        if data.lstrip().startswith(b"{"):
            return cls.parse_spiffe(trust_domain, data)
        return cls.parse_pem(trust_domain, data)


class X509ContextSource(Protocol):
    """What ``BundleSet.follow`` needs of py-spiffe's ``X509Source``."""

    def get_x509_context(self) -> Any: ...

    def subscribe_for_updates(self, callback: Callable[[], None]) -> None: ...


class BundleSet:
    """Trust bundles by trust domain. Updates (from any thread) swap the whole mapping at
    once; ``version`` changes only when the set of authorities does, so caches built on a
    version stay valid across the Workload API's many pushes that only rotate our own SVID."""

    def __init__(self, bundles: Iterable[TrustBundle] = ()) -> None:
        self._lock = threading.Lock()
        self._bundles: Mapping[str, TrustBundle] = {}
        self._content: frozenset[tuple[str, bytes]] = frozenset()
        self.version = 0
        self.replace(bundles)

    def get(self, trust_domain: str) -> TrustBundle | None:
        return self._bundles.get(trust_domain)

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(sorted(self._bundles))

    def __len__(self) -> int:
        return len(self._bundles)

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self._bundles

    def __iter__(self) -> Iterator[TrustBundle]:
        return iter(list(self._bundles.values()))

    def put(self, bundle: TrustBundle) -> None:
        """Add or replace one trust domain's bundle."""
        with self._lock:
            self._swap({**self._bundles, bundle.trust_domain: bundle})

    def replace(self, bundles: Iterable[TrustBundle]) -> None:
        """The whole set: trust domains left out are no longer trusted."""
        mapping = {b.trust_domain: b for b in bundles}
        with self._lock:
            self._swap(mapping)

    def _swap(self, mapping: dict[str, TrustBundle]) -> None:
        content = frozenset((domain, digest) for domain, b in mapping.items() for digest in b.digests)
        content |= frozenset((domain, b"") for domain in mapping)  # a domain with no X.509 authority
        if content == self._content:
            return
        self._bundles = mapping  # readers see the new mapping before the new version
        self._content = content
        self.version += 1

    def update_from_x509_context(self, context: Any) -> None:
        """The bundles of a py-spiffe ``X509Context`` (own trust domain and federated ones)."""
        self.replace(TrustBundle(bundle.trust_domain.name, tuple(bundle.x509_authorities))
                     for bundle in context.x509_bundle_set.bundles)

    def follow(self, source: X509ContextSource) -> None:
        """Take the bundles ``source`` (an ``X509Source``) has now, and every update it pushes."""
        def update() -> None:
            self.update_from_x509_context(source.get_x509_context())

        update()
        source.subscribe_for_updates(update)


# -- chain verification

ChainVerifier = Callable[[x509.Certificate, Sequence[x509.Certificate], Sequence[x509.Certificate], float],
                         tuple[float, float]]
"""(leaf, intermediates, roots, at) → (not_before, not_after) of the verified path; raises
``WorkloadError`` (``untrusted_svid``) when no path leads to one of ``roots``."""


def _window(chain: Iterable[x509.Certificate]) -> tuple[float, float]:
    certs = list(chain)
    return (max(c.not_valid_before_utc.timestamp() for c in certs),
            min(c.not_valid_after_utc.timestamp() for c in certs))


def verify_chain_webpki(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                        roots: Sequence[x509.Certificate], at: float) -> tuple[float, float]:
    """RFC 5280 path validation by pyca/cryptography's ``x509.verification`` (cryptography ≥ 45).

    Its default leaf profile is the Web PKI's, which refuses SPIFFE leaves (no DNS name, an
    empty subject with a non-critical SAN): the leaf's extensions are therefore not judged
    here (``ExtensionPolicy.permit_all``) but by ``check_svid_leaf``, per X509-SVID §5.2. The
    CAs on the path keep the Web PKI CA profile (basic constraints, key usage, path length)."""
    from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

    builder = (PolicyBuilder().store(Store(list(roots)))
               .time(datetime.datetime.fromtimestamp(at, tz=datetime.timezone.utc))
               .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                   ee_policy=ExtensionPolicy.permit_all()))
    try:
        verified = builder.build_client_verifier().verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise WorkloadError(f"certificate does not chain to the trust bundle: {exc}", code="untrusted_svid") from None
    return _window(verified.chain)


def _directly_signed(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)  # issuer name, then the signature with its key
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def verify_chain_signatures(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                            roots: Sequence[x509.Certificate], at: float) -> tuple[float, float]:
    """Signatures and names only, for cryptography < 45 (no configurable ``PolicyBuilder``):
    each certificate's issuer name is its signer's subject and the signature verifies with the
    signer's public key, up to a root of the bundle; a signer taken from ``intermediates`` must
    be a CA. Validity is returned as the path's window (checked by the caller at each use)."""
    path = [leaf]
    current = leaf
    pool = list(intermediates)
    for _ in range(MAX_CHAIN_LENGTH):
        root = next((r for r in roots if _directly_signed(current, r)), None)
        if root is not None:
            return _window([*path, root])
        signer = next((c for c in pool if _is_ca(c) and _directly_signed(current, c)), None)
        if signer is None:
            break
        pool.remove(signer)
        path.append(signer)
        current = signer
    raise WorkloadError("certificate is not signed by an authority of its trust domain's bundle",
                        code="untrusted_svid")


def default_chain_verifier() -> ChainVerifier:
    from cryptography.x509 import verification

    return verify_chain_webpki if hasattr(verification.PolicyBuilder, "extension_policies") \
        else verify_chain_signatures


# -- peer X.509-SVIDs

def check_svid_leaf(leaf: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID leaf, after the checks X509-SVID asks of a validator:
    §2 "An X.509 SVID MUST contain exactly one URI SAN ... Validators encountering an SVID
    containing more than one URI SAN MUST reject the SVID"; §3.1 "Leaf certificate SPIFFE IDs
    MUST have a non-root path component"; §5.2 "the validator MUST ensure that the CA field in
    the basic constraints extension is set to false, and that keyCertSign and cRLSign are not
    set in the key usage extension". Raises ``WorkloadError`` (``invalid_svid``)."""
    def invalid(why: str) -> WorkloadError:
        return WorkloadError(f"peer certificate is not an X.509-SVID: {why}", code="invalid_svid")

    try:
        extensions = leaf.extensions
    except ValueError as exc:
        raise invalid(f"malformed extensions ({exc})") from None
    try:
        names = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise invalid("it has no URI SAN") from None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise invalid(f"it has {len(uris)} URI SANs, an X.509-SVID has exactly one")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except WorkloadError as exc:
        raise invalid(exc.message) from None
    if not spiffe_id.path:
        raise invalid(f"{spiffe_id} names a trust domain; a leaf SVID's ID has a path")
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise invalid("it is a CA certificate (cA is true)")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        if usage.key_cert_sign or usage.crl_sign:
            raise invalid("its key usage includes keyCertSign or cRLSign")
    return spiffe_id


def pem_certificates(text: str) -> list[bytes]:
    """The DER certificates in a (URL-encoded) PEM text, leaf first, as Envoy forwards them
    (``source.certificate``, XFCC ``Cert``/``Chain``). Raises ``WorkloadError`` (``invalid_svid``)."""
    if len(text) > MAX_CERTIFICATE_TEXT:
        raise WorkloadError(f"peer certificate text of {len(text)} characters is over the limit", code="invalid_svid")
    pem = urllib.parse.unquote(text) if "%" in text else text
    blocks = _PEM_BLOCK.findall(pem)
    if not blocks:
        raise WorkloadError("peer certificate is not PEM", code="invalid_svid")
    if len(blocks) > MAX_CHAIN_LENGTH:
        raise WorkloadError(f"peer certificate chain of {len(blocks)} is longer than {MAX_CHAIN_LENGTH}",
                            code="invalid_svid")
    try:
        return [base64.b64decode("".join(body.split()), validate=True) for body in blocks]
    except (ValueError, binascii.Error):
        raise WorkloadError("peer certificate PEM is not base64", code="invalid_svid") from None


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """A peer's X.509-SVID, validated. ``not_before``/``not_after`` span the verified path
    (the leaf alone when no bundle is configured)."""

    spiffe_id: str
    trust_domain: str
    cert_sha256: str  # hex SHA-256 of the leaf's DER
    not_before: float
    not_after: float
    chain_verified: bool = False
    intermediates_sha256: str = ""  # hex SHA-256 of the certificates sent after the leaf, if any

    @property
    def key(self) -> str:
        """What the certificate is cached under: the leaf, and what came with it."""
        return self.cert_sha256 + (":" + self.intermediates_sha256 if self.intermediates_sha256 else "")


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A certificate that can never be accepted (while the bundles stay as they are)."""

    code: str
    message: str

    def error(self) -> WorkloadError:
        return WorkloadError(self.message, code=self.code)


@dataclass
class CertificateCacheStats:
    parses: int = 0  # certificates parsed and validated (at most once each while cached)
    hits: int = 0  # looked up by the exact text Envoy sent
    digest_hits: int = 0  # new text (another encoding), known certificate: no parse
    expired: int = 0  # entries dropped at their notAfter
    evictions: int = 0  # entries dropped to stay within max_entries


class PeerCertificateCache:
    """Peer certificates, parsed and validated once each, then one dict lookup per request.

    Keyed first by the exact text Envoy sent (a warm lookup hashes that string and nothing
    else), then by the SHA-256 of the DER (the same certificate in another encoding is not
    parsed again). Both maps are LRU-bounded by ``max_entries``. An entry stops being served
    at the certificate's notAfter (the earliest of its verified path): it is dropped, and a
    small bounded tombstone answers ``svid_expired`` for later requests without parsing again.
    Refusals that cannot change (not an SVID, untrusted chain) are cached as well, so a bad
    certificate costs one parse too; all entries are dropped when the bundles change.

    With ``bundles``, the certificate must chain to its own trust domain's authorities;
    without, Envoy's validation at the handshake is what established trust.
    """

    def __init__(self, *, bundles: BundleSet | None = None, max_entries: int = 10_000,
                 verify_chain: ChainVerifier | None = None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.bundles = bundles
        self.max_entries = max_entries
        self._verify_chain = verify_chain or default_chain_verifier()
        self._by_text: OrderedDict[str, PeerCertificate | _Refusal] = OrderedDict()
        self._by_digest: OrderedDict[str, PeerCertificate | _Refusal] = OrderedDict()
        self._expired: OrderedDict[str, PeerCertificate] = OrderedDict()
        self._bundles_version = bundles.version if bundles is not None else 0
        self.stats = CertificateCacheStats()

    def __len__(self) -> int:
        return len(self._by_digest)

    def clear(self) -> None:
        self._by_text.clear()
        self._by_digest.clear()
        self._expired.clear()

    def _follow_bundles(self) -> None:
        """Outcomes were judged against the bundles of one version: a new version empties the cache."""
        bundles = self.bundles
        if bundles is not None and bundles.version != self._bundles_version:
            self.clear()
            self._bundles_version = bundles.version

    def get(self, certificate: str, principal: str, now: float) -> PeerCertificate:
        """The validated certificate whose single URI SAN is ``principal``, valid at ``now``;
        raises ``WorkloadError``: ``invalid_svid``, ``svid_mismatch``, ``svid_expired``,
        ``svid_not_yet_valid``, ``untrusted_trust_domain``, ``untrusted_svid``."""
        self._follow_bundles()
        entry = self._by_text.get(certificate)
        if entry is None:
            tombstone = self._expired.get(certificate)
            if tombstone is not None and now >= tombstone.not_after:
                raise _expired_error(tombstone)
            entry = self._load(certificate, now)
            self._remember(self._by_text, certificate, entry)
        else:
            self.stats.hits += 1
            self._by_text.move_to_end(certificate)
        if type(entry) is _Refusal:
            raise entry.error()
        assert isinstance(entry, PeerCertificate)
        if now >= entry.not_after:
            self._expire(certificate, entry)
            raise _expired_error(entry)
        if now < entry.not_before:
            raise WorkloadError(f"certificate of {entry.spiffe_id} is not valid before {_iso(entry.not_before)}",
                                code="svid_not_yet_valid")
        if entry.spiffe_id != principal:
            raise WorkloadError(f"certificate names {entry.spiffe_id}, Envoy reported the peer as {principal[:200]}",
                                code="svid_mismatch")
        return entry

    def _remember(self, table: OrderedDict[str, Any], key: str, entry: Any) -> None:
        table[key] = entry
        if len(table) > self.max_entries:
            table.popitem(last=False)
            self.stats.evictions += 1

    def _expire(self, text: str, entry: PeerCertificate) -> None:
        self.stats.expired += 1
        self._by_text.pop(text, None)
        self._by_digest.pop(entry.key, None)
        self._expired[text] = entry
        if len(self._expired) > self.max_entries:
            self._expired.popitem(last=False)

    def _load(self, text: str, now: float) -> PeerCertificate | _Refusal:
        try:
            ders = pem_certificates(text)
        except WorkloadError as exc:
            if len(text) > MAX_CERTIFICATE_TEXT:
                raise  # not worth keeping as a cache key
            return _Refusal(exc.code, exc.message)
        leaf_digest = hashlib.sha256(ders[0]).hexdigest()
        rest_digest = hashlib.sha256(b"".join(ders[1:])).hexdigest() if len(ders) > 1 else ""
        key = leaf_digest + (":" + rest_digest if rest_digest else "")
        known = self._by_digest.get(key)
        if known is not None:
            self.stats.digest_hits += 1
            self._by_digest.move_to_end(key)
            return known
        self.stats.parses += 1
        try:
            entry: PeerCertificate | _Refusal = self._validate(ders, leaf_digest, rest_digest, now)
        except WorkloadError as exc:
            entry = _Refusal(exc.code, exc.message)
        except Exception as exc:  # a certificate odd enough to surprise the parser: refused, never accepted
            entry = _Refusal("invalid_svid", f"peer certificate could not be read: {type(exc).__name__}")
        self._remember(self._by_digest, key, entry)
        return entry

    def _validate(self, ders: list[bytes], digest: str, rest_digest: str, now: float) -> PeerCertificate:
        try:
            certificates = [x509.load_der_x509_certificate(der) for der in ders]
        except ValueError as exc:
            raise WorkloadError(f"peer certificate is not X.509: {exc}", code="invalid_svid") from None
        leaf = certificates[0]
        spiffe_id = check_svid_leaf(leaf)
        domain = spiffe_id.trust_domain.name
        not_before, not_after = _window([leaf])
        if now >= not_after:  # time only moves on: this certificate will never be good again
            raise WorkloadError(f"certificate of {spiffe_id} expired at {_iso(not_after)}", code="svid_expired")
        verified = False
        if self.bundles is not None:
            bundle = self.bundles.get(domain)
            if bundle is None or not bundle.x509_authorities:
                raise WorkloadError(f"no X.509 trust bundle for trust domain {domain!r} of {spiffe_id}",
                                    code="untrusted_trust_domain")
            # The path is judged at a time inside the leaf's validity, so the outcome can be kept:
            # whether the certificate is valid *now* is checked at every use against the window.
            at = min(max(now, not_before), not_after - 1.0)
            not_before, not_after = self._verify_chain(leaf, certificates[1:], bundle.x509_authorities, at)
            verified = True
        return PeerCertificate(str(spiffe_id), domain, digest, not_before, not_after, verified, rest_digest)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _expired_error(entry: PeerCertificate) -> WorkloadError:
    return WorkloadError(f"certificate of {entry.spiffe_id} expired at {_iso(entry.not_after)}", code="svid_expired")


__all__ = [
    "BundleError", "BundleSet", "ChainVerifier", "PeerCertificate", "PeerCertificateCache", "SpiffeId",
    "TrustBundle", "TrustDomain", "accept_trust_domains", "check_svid_leaf", "default_chain_verifier",
    "pem_certificates", "split_spiffe_id", "verify_chain_signatures", "verify_chain_webpki",
]
