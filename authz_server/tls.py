"""authz-server's own TLS: its certificate and the roots it trusts for client certificates.

Two sources behind one ``TlsSource`` Protocol:

* ``WorkloadApiTls``: the X.509-SVID and trust bundles from the SPIFFE Workload API
  (SPIRE agent, or ``authz-server identity serve``), pushed on every rotation;
* ``FileTls``: PEM files, re-read when they change (cert-manager and friends).

``server_credentials`` hands gRPC a dynamic configuration: each new connection picks up
the current certificate, so rotation never needs a restart and open connections are not
dropped. ``SpiffeIdCheck`` then admits only client certificates whose SPIFFE ID is listed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import ConfigError


@dataclass(frozen=True)
class TlsMaterial:
    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes
    version: str  # changes whenever any part changes


def _material(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> TlsMaterial:
    version = hashlib.sha256(chain_pem + b"\0" + roots_pem + b"\0" + key_pem).hexdigest()[:16]
    return TlsMaterial(chain_pem, key_pem, roots_pem, version)


class TlsSource(Protocol):
    def material(self) -> TlsMaterial: ...

    def close(self) -> None: ...


class FileTls:
    """PEM files; checked for changes at most once a second."""

    def __init__(self, cert_file: str, key_file: str, ca_file: str) -> None:
        self._paths = (Path(cert_file), Path(key_file), Path(ca_file))
        self._stamp: tuple[Any, ...] = ()
        self._checked = 0.0
        self._current = self._load()

    def _load(self) -> TlsMaterial:
        try:
            self._stamp = tuple(p.stat().st_mtime_ns for p in self._paths)
            chain, key, roots = (p.read_bytes() for p in self._paths)
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}", key="tls") from None
        for what, data in (("cert_file", chain), ("ca_file", roots)):
            try:
                x509.load_pem_x509_certificates(data)
            except ValueError:
                raise ConfigError("not a PEM certificate (chain)", key=f"tls.{what}") from None
        try:
            serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            raise ConfigError("not an unencrypted PEM private key", key="tls.key_file") from None
        return _material(chain, key, roots)

    def material(self) -> TlsMaterial:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                stamp = tuple(p.stat().st_mtime_ns for p in self._paths)
            except OSError:
                return self._current  # a file mid-replacement: keep the last good material
            if stamp != self._stamp:
                try:
                    self._current = self._load()
                except ConfigError:
                    pass  # half-written files: keep serving the last good pair
        return self._current

    def close(self) -> None:
        pass


class WorkloadApiTls:
    """The SVID and bundles of this process's workload, from the SPIFFE Workload API."""

    def __init__(self, socket: str, *, timeout: float = 30.0) -> None:
        from spiffe.errors import PySpiffeError
        from spiffe.workloadapi.x509_source import X509Source

        path = socket if socket.startswith("unix:") else f"unix:{socket}"
        try:
            self._source = X509Source(socket_path=path, timeout_in_seconds=timeout)
        except PySpiffeError as exc:  # no socket, no agent behind it, or no SVID for us in time
            reason = _first_line(exc).removeprefix("Invalid WorkloadApiClient configuration: ")
            raise ConfigError(f"no X.509-SVID from the Workload API: {reason}", key="tls.spiffe_socket") from None
        self._lock = threading.Lock()
        self._cache: tuple[Any, TlsMaterial] | None = None

    def material(self) -> TlsMaterial:
        context = self._source.get_x509_context()
        svid = context.default_svid
        with self._lock:
            if self._cache is not None and self._cache[0] == (id(svid), id(context.x509_bundle_set)):
                return self._cache[1]
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
        key = svid.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        roots = b"".join(authority.public_bytes(serialization.Encoding.PEM)
                         for bundle in context.x509_bundle_set.bundles for authority in bundle.x509_authorities)
        material = _material(chain, key, roots)
        with self._lock:
            if self._cache is None or self._cache[1].version != material.version:
                self._cache = ((id(svid), id(context.x509_bundle_set)), material)
        return material

    @property
    def spiffe_id(self) -> str:
        return str(self._source.get_x509_context().default_svid.spiffe_id)

    def close(self) -> None:
        self._source.close()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def server_credentials(source: TlsSource, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
    first = source.material()
    served = {"version": first.version}

    def configuration(material: TlsMaterial) -> Any:
        return grpc.ssl_server_certificate_configuration([(material.key_pem, material.chain_pem)],
                                                         root_certificates=material.roots_pem)

    def fetch() -> Any:
        # gRPC calls this before each new handshake: None keeps the current configuration.
        material = source.material()
        if material.version == served["version"]:
            return None
        served["version"] = material.version
        return configuration(material)

    return grpc.dynamic_ssl_server_credentials(configuration(first), fetch,
                                               require_client_authentication=require_client_auth)


class ServerSslContext:
    """An ``ssl.SSLContext`` for asyncio servers that follows the source's rotations
    (checked at most once a second, before new handshakes)."""

    def __init__(self, source: TlsSource, *, require_client_cert: bool = True) -> None:
        import ssl

        self._source = source
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        self._version = ""
        self._checked = 0.0
        self.refresh()

    def refresh(self) -> None:
        now = time.monotonic()
        if self._version and now - self._checked < 1.0:
            return
        self._checked = now
        material = self._source.material()
        if material.version == self._version:
            return
        import tempfile

        # The ssl module loads keys from files only; the files live for the call alone.
        with tempfile.TemporaryDirectory() as folder:
            chain, key = Path(folder) / "chain.pem", Path(folder) / "key.pem"
            chain.write_bytes(material.chain_pem)
            key.write_bytes(material.key_pem)
            key.chmod(0o600)
            self.context.load_cert_chain(chain, key)
        self.context.load_verify_locations(cadata=material.roots_pem.decode())
        self._version = material.version


def _spiffe_id(load: Callable[[], x509.Certificate]) -> str | None:
    try:
        sans = load().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None  # an SVID has exactly one URI SAN


def spiffe_id_of(der: bytes) -> str | None:
    """The SPIFFE ID of a DER certificate (asyncio TLS peers)."""
    return _spiffe_id(lambda: x509.load_der_x509_certificate(der)) if der else None


def peer_spiffe_id(auth_context: dict[str, list[bytes]]) -> str | None:
    """The SPIFFE ID of the client certificate gRPC verified."""
    pems = auth_context.get("x509_pem_cert") or []
    return _spiffe_id(lambda: x509.load_pem_x509_certificate(pems[0])) if pems else None


class SpiffeIdCheck:
    """Is this gRPC caller one of the allowed SPIFFE IDs? Remembered per connection."""

    def __init__(self, accept: Callable[[str], bool], *, max_entries: int = 10_000) -> None:
        self._accept = accept
        self._seen: dict[tuple[str, bytes], str | None] = {}
        self.max_entries = max_entries

    def caller(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's SPIFFE ID if it is allowed, else None."""
        auth = context.auth_context() or {}
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        key = (context.peer(), pem)
        if key in self._seen:
            return self._seen[key]
        spiffe_id = peer_spiffe_id(auth)
        allowed = spiffe_id if spiffe_id is not None and self._accept(spiffe_id) else None
        if len(self._seen) >= self.max_entries:
            self._seen.clear()
        self._seen[key] = allowed
        return allowed


def tls_source_from(config: Any) -> TlsSource | None:
    """The configured source, or None when TLS is off."""
    if config is None:
        return None
    if config.spiffe_socket:
        return WorkloadApiTls(config.spiffe_socket)
    return FileTls(config.cert_file, config.key_file, config.ca_file)


__all__ = ["FileTls", "ServerSslContext", "SpiffeIdCheck", "TlsMaterial", "TlsSource", "WorkloadApiTls",
           "peer_spiffe_id", "server_credentials", "spiffe_id_of", "tls_source_from"]
