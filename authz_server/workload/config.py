"""The dev SPIFFE issuer's YAML config: trust domains, their federation, and registered workloads.

::

    state_dir: .authz/identity        # CA and JWT keys (0600), created on first start
    svid_ttl: 1h                      # X.509-SVID lifetime; re-issued at half of it
    jwt_svid_ttl: 5m                  # JWT-SVID lifetime
    ca_ttl: 24h                       # CA lifetime; a successor is published at half of it
    ca_publish_ahead: 30s             # a new CA is in every bundle this long before it signs
    jwt_algorithm: ES256              # or RS256: how JWT-SVIDs are signed
    bundle_refresh_hint: 5m           # spiffe_refresh_hint in the SPIFFE bundle documents
    ready_file: run/identity.ready    # optional: written once every socket serves, removed on exit
    bundle_endpoint:                  # optional: the SPIFFE bundle endpoint (https_web profile)
      addr: 127.0.0.1:8443            #   GET /<trust domain> answers that domain's SPIFFE bundle
      cert_file: tls/endpoint.pem     #   its Web PKI server certificate (chain) and key
      key_file: tls/endpoint.key
    trust_domains:
      - name: example.org
        federates_with:
          - partner.org               # another domain of this issuer
          - trust_domain: remote.org  # another issuer's, fetched from its bundle endpoint
            bundle_endpoint_url: https://issuer.remote.org:8443/remote.org
            profile: https_web
            ca_file: tls/web-ca.pem   # optional: who signs that endpoint's certificate (default: the system's CAs)
      - name: partner.org
    workloads:
      - name: frontend
        spiffe_id: spiffe://example.org/frontend
        socket: run/frontend.sock
        dns_names: [frontend]         # optional, as SPIRE's entry -dns: DNS SANs (the first is the CN)

Relative paths are read relative to the config file's directory (the working directory for
``IdentityConfig.from_mapping``/``from_dict`` without ``base_dir``). Every error names the key it is about.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit


from ..configkeys import only as _only
from ..configkeys import readable_file as _readable_file
from ..durations import parse_duration
from ..errors import ConfigError, WorkloadError
from ..identity.spiffe import split_spiffe_id
from ..yamlfile import read_yaml_file

JWT_ALGORITHMS = ("ES256", "RS256")
MIN_SVID_TTL = 2.0  # seconds; rotation at half of it must still leave time to push
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL (Linux unix(7))

DEFAULTS = {"svid_ttl": 3600.0, "jwt_svid_ttl": 300.0, "ca_ttl": 86400.0, "ca_publish_ahead": 30.0,
            "bundle_refresh_hint": 300.0}
_TOP_KEYS = {"state_dir", "svid_ttl", "jwt_svid_ttl", "ca_ttl", "ca_publish_ahead", "jwt_algorithm",
             "bundle_refresh_hint", "ready_file", "bundle_endpoint", "trust_domains", "workloads"}
PROFILES = ("https_web",)


@dataclass(frozen=True, slots=True)
class TrustDomainConfig:
    name: str
    federates_with: tuple[str, ...] = ()  # trust domain names: this issuer's own, or remote partners'

    @property
    def id(self) -> str:
        """The trust domain's SPIFFE ID, ``spiffe://<name>`` (the key bundles are served under)."""
        return f"spiffe://{self.name}"


@dataclass(frozen=True, slots=True)
class RemotePartner:
    """A trust domain another issuer serves, whose bundle is fetched from its bundle endpoint."""

    trust_domain: str
    bundle_endpoint_url: str
    profile: str = "https_web"
    ca_file: str | None = None  # the CA of the endpoint's Web PKI certificate; None: the system's


@dataclass(frozen=True, slots=True)
class BundleEndpointConfig:
    addr: str
    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """A registered workload: whoever connects to ``socket`` is this workload."""

    name: str
    spiffe_id: str
    socket: str
    dns_names: tuple[str, ...] = ()  # extra DNS SANs, for clients that verify a host name (gRPC)

    @property
    def trust_domain(self) -> str:
        return split_spiffe_id(self.spiffe_id)[0]


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    trust_domains: tuple[TrustDomainConfig, ...]
    workloads: tuple[WorkloadConfig, ...]
    state_dir: str = ".authz/identity"
    svid_ttl: float = DEFAULTS["svid_ttl"]
    jwt_svid_ttl: float = DEFAULTS["jwt_svid_ttl"]
    ca_ttl: float = DEFAULTS["ca_ttl"]
    ca_publish_ahead: float = DEFAULTS["ca_publish_ahead"]
    jwt_algorithm: str = "ES256"
    bundle_refresh_hint: float = DEFAULTS["bundle_refresh_hint"]
    ready_file: str | None = None
    bundle_endpoint: BundleEndpointConfig | None = None
    remote_partners: tuple[RemotePartner, ...] = ()

    def trust_domain(self, name: str) -> TrustDomainConfig:
        for domain in self.trust_domains:
            if domain.name == name:
                return domain
        raise KeyError(name)

    def workload(self, name: str) -> WorkloadConfig:
        for workload in self.workloads:
            if workload.name == name:
                return workload
        raise KeyError(name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None) -> "IdentityConfig":
        """The same as ``from_mapping``."""
        return cls.from_mapping(data, base_dir=base_dir)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *,
                     base_dir: str | os.PathLike[str] | None = None) -> "IdentityConfig":
        """Build and check a config from parsed YAML; raises ``ConfigError`` naming the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"the identity config must be a mapping, got {type(data).__name__}")
        _only(data, _TOP_KEYS, "")
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        values: dict[str, Any] = {}
        if "state_dir" in data:
            values["state_dir"] = _path(data["state_dir"], "state_dir", base)
        else:
            values["state_dir"] = str(base / ".authz" / "identity")
        for name in ("svid_ttl", "jwt_svid_ttl", "ca_ttl", "ca_publish_ahead", "bundle_refresh_hint"):
            if name in data:
                values[name] = _duration(data[name], name)
        svid_ttl = values.get("svid_ttl", DEFAULTS["svid_ttl"])
        if svid_ttl < MIN_SVID_TTL:
            raise ConfigError(f"must be at least {MIN_SVID_TTL:g}s, got {data['svid_ttl']!r}", key="svid_ttl")
        if values.get("jwt_svid_ttl", DEFAULTS["jwt_svid_ttl"]) < 1:
            raise ConfigError("must be at least 1s", key="jwt_svid_ttl")
        ca_ttl = values.get("ca_ttl", DEFAULTS["ca_ttl"])
        if ca_ttl < 2 * svid_ttl:
            raise ConfigError(f"must be at least twice svid_ttl ({2 * svid_ttl:g}s): the CA must outlive the "
                              "SVIDs it signs", key="ca_ttl")
        if values.get("ca_publish_ahead", DEFAULTS["ca_publish_ahead"]) >= ca_ttl / 2:
            raise ConfigError("must be shorter than half of ca_ttl", key="ca_publish_ahead")
        if values.get("bundle_refresh_hint", DEFAULTS["bundle_refresh_hint"]) < 1:
            raise ConfigError("must be at least 1s", key="bundle_refresh_hint")
        if "jwt_algorithm" in data:
            if data["jwt_algorithm"] not in JWT_ALGORITHMS:
                raise ConfigError(f"{data['jwt_algorithm']!r} is not one of {', '.join(JWT_ALGORITHMS)}",
                                  key="jwt_algorithm")
            values["jwt_algorithm"] = data["jwt_algorithm"]
        if data.get("ready_file") is not None:
            values["ready_file"] = _path(data["ready_file"], "ready_file", base)
        domains, remote = _trust_domains(data.get("trust_domains"), base)
        values["trust_domains"] = domains
        values["remote_partners"] = remote
        if data.get("bundle_endpoint") is not None:
            values["bundle_endpoint"] = _bundle_endpoint(data["bundle_endpoint"], base)
        values["workloads"] = _workloads(data.get("workloads"), {d.name for d in domains}, base)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "IdentityConfig":
        """Read a YAML file; relative paths in it are relative to the file's directory."""
        return cls.from_mapping(read_yaml_file(path), base_dir=Path(path).resolve().parent)


def _duration(value: Any, key: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key) from None


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {value!r}", key=key)
    return value


def _path(value: Any, key: str, base: Path) -> str:
    path = Path(os.path.expanduser(_text(value, key)))
    return str(path if path.is_absolute() else base / path)


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"expected a non-empty list, got {value!r}", key=key)
    return value


def _domain_name(value: Any, key: str) -> str:
    name = _text(value, key)
    if name.startswith("spiffe://"):
        raise ConfigError(f"write the trust domain name without the scheme: {name[len('spiffe://'):]!r}", key=key)
    try:
        domain, path = split_spiffe_id(f"spiffe://{name}")
    except WorkloadError:
        raise ConfigError(f"{name!r} is not a trust domain name (lowercase letters, digits, '.', '-', '_')",
                          key=key) from None
    if path:
        raise ConfigError(f"{name!r} is not a trust domain name (no '/')", key=key)
    return domain


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _dns_name(value: Any, key: str) -> str:
    name = _text(value, key).lower()
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ConfigError(f"{value!r} is not a DNS name (letters, digits and hyphens, dot-separated)", key=key)
    return name


def _trust_domains(value: Any, base: Path) -> tuple[tuple[TrustDomainConfig, ...], tuple[RemotePartner, ...]]:
    entries = _list(value, "trust_domains")
    names: list[str] = []
    raw: list[tuple[str, Mapping[str, Any]]] = []
    for i, entry in enumerate(entries):
        key = f"trust_domains[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"expected a mapping with 'name', got {entry!r}", key=key)
        _only(entry, {"name", "federates_with"}, f"{key}.")
        name = _domain_name(entry.get("name"), f"{key}.name")
        if name in names:
            raise ConfigError(f"{name!r} is listed twice", key=f"{key}.name")
        names.append(name)
        raw.append((key, entry))
    remote: dict[str, RemotePartner] = {}  # first every remote partner, then names may refer to them
    for key, entry in raw:
        partners = entry.get("federates_with", [])
        if not isinstance(partners, list):
            raise ConfigError(f"expected a list of trust domain names, got {partners!r}", key=f"{key}.federates_with")
        for j, partner in enumerate(partners):
            if isinstance(partner, Mapping):
                pkey = f"{key}.federates_with[{j}]"
                found = _remote_partner(partner, pkey, base)
                if found.trust_domain in names:
                    raise ConfigError(f"{found.trust_domain!r} is one of this issuer's trust_domains: name it "
                                      "without a bundle endpoint", key=f"{pkey}.trust_domain")
                if remote.setdefault(found.trust_domain, found) != found:
                    raise ConfigError(f"{found.trust_domain!r} is federated with twice, differently",
                                      key=f"{pkey}.trust_domain")
    domains = []
    for (key, entry), name in zip(raw, names):
        federates: list[str] = []
        for j, partner in enumerate(entry.get("federates_with", [])):
            pkey = f"{key}.federates_with[{j}]"
            if isinstance(partner, Mapping):
                partner_name = _domain_name(partner.get("trust_domain"), f"{pkey}.trust_domain")
            else:
                partner_name = _domain_name(partner, pkey)
                if partner_name not in names and partner_name not in remote:
                    raise ConfigError(f"{partner_name!r} is not one of the configured trust_domains (a remote "
                                      "partner needs {trust_domain, bundle_endpoint_url, profile})", key=pkey)
            if partner_name == name:
                raise ConfigError("a trust domain does not federate with itself", key=pkey)
            if partner_name not in federates:
                federates.append(partner_name)
        domains.append(TrustDomainConfig(name, tuple(federates)))
    return tuple(domains), tuple(remote.values())


def _remote_partner(entry: Mapping[str, Any], key: str, base: Path) -> RemotePartner:
    """SPIFFE Federation §5: the bundle endpoint URL and profile, per federated trust domain."""
    _only(entry, {"trust_domain", "bundle_endpoint_url", "profile", "ca_file"}, f"{key}.")
    domain = _domain_name(entry.get("trust_domain"), f"{key}.trust_domain")
    url = _text(entry.get("bundle_endpoint_url"), f"{key}.bundle_endpoint_url")
    parsed = urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ConfigError(f"expected an https:// URL (the https_web profile), got {url!r}",
                          key=f"{key}.bundle_endpoint_url")
    profile = entry.get("profile", "https_web")
    if profile not in PROFILES:
        raise ConfigError(f"{profile!r} is not a profile this issuer speaks; expected one of {', '.join(PROFILES)}",
                          key=f"{key}.profile")
    ca_file = None
    if entry.get("ca_file") is not None:
        ca_file = _readable_file(_path(entry["ca_file"], f"{key}.ca_file", base), f"{key}.ca_file")
    return RemotePartner(domain, url, profile, ca_file)


def _bundle_endpoint(value: Any, base: Path) -> BundleEndpointConfig:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping with addr, cert_file and key_file, got {value!r}", key="bundle_endpoint")
    _only(value, {"addr", "cert_file", "key_file"}, "bundle_endpoint.")
    addr = _text(value.get("addr"), "bundle_endpoint.addr")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"expected host:port, got {addr!r}", key="bundle_endpoint.addr")
    for name in ("cert_file", "key_file"):
        if value.get(name) is None:
            raise ConfigError("the https_web profile serves with a Web PKI certificate: give cert_file and "
                              "key_file", key=f"bundle_endpoint.{name}")
    return BundleEndpointConfig(
        addr, _readable_file(_path(value["cert_file"], "bundle_endpoint.cert_file", base), "bundle_endpoint.cert_file"),
        _readable_file(_path(value["key_file"], "bundle_endpoint.key_file", base), "bundle_endpoint.key_file"))


def _workloads(value: Any, domains: set[str], base: Path) -> tuple[WorkloadConfig, ...]:
    entries = _list(value, "workloads")
    workloads: list[WorkloadConfig] = []
    for i, entry in enumerate(entries):
        key = f"workloads[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"expected a mapping with name, spiffe_id and socket, got {entry!r}", key=key)
        _only(entry, {"name", "spiffe_id", "socket", "dns_names"}, f"{key}.")
        name = _text(entry.get("name"), f"{key}.name")
        spiffe_id = _text(entry.get("spiffe_id"), f"{key}.spiffe_id")
        try:
            domain, path = split_spiffe_id(spiffe_id)
        except WorkloadError as exc:
            raise ConfigError(exc.message, key=f"{key}.spiffe_id") from None
        if not path:
            # X509-SVID §2: "The SPIFFE ID of a leaf SVID ... MUST have a non-root path component."
            raise ConfigError(f"{spiffe_id!r} names a trust domain, not a workload (add a path)",
                              key=f"{key}.spiffe_id")
        if domain not in domains:
            raise ConfigError(f"trust domain {domain!r} is not one of the configured trust_domains",
                              key=f"{key}.spiffe_id")
        socket = _path(entry.get("socket"), f"{key}.socket", base)
        if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
            raise ConfigError(f"{socket!r} is {len(os.fsencode(socket))} bytes; a Unix socket path may have at most "
                              f"{MAX_SOCKET_PATH}", key=f"{key}.socket")
        for other in workloads:
            if other.name == name:
                raise ConfigError(f"{name!r} is listed twice", key=f"{key}.name")
            if other.socket == socket:
                raise ConfigError(f"{socket!r} is already the socket of {other.name!r}", key=f"{key}.socket")
        listed = _list(entry["dns_names"], f"{key}.dns_names") if "dns_names" in entry else []
        dns_names = tuple(_dns_name(v, f"{key}.dns_names[{j}]") for j, v in enumerate(listed))
        workloads.append(WorkloadConfig(name, spiffe_id, socket, dns_names))
    return tuple(workloads)
