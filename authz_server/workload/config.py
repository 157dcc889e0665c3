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
    trust_domains:
      - name: example.org
        federates_with: [partner.org]
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
             "bundle_refresh_hint", "ready_file", "trust_domains", "workloads"}


@dataclass(frozen=True, slots=True)
class TrustDomainConfig:
    name: str
    federates_with: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """The trust domain's SPIFFE ID, ``spiffe://<name>`` (the key bundles are served under)."""
        return f"spiffe://{self.name}"


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
        for key in data:
            if key not in _TOP_KEYS:
                raise ConfigError(f"unknown key; expected one of {', '.join(sorted(_TOP_KEYS))}", key=str(key))
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
        domains = _trust_domains(data.get("trust_domains"))
        values["trust_domains"] = domains
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


def _only(data: Mapping[str, Any], allowed: set[str], key: str) -> None:
    for name in data:
        if name not in allowed:
            raise ConfigError(f"unknown key; expected one of {', '.join(sorted(allowed))}", key=f"{key}.{name}")


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


def _trust_domains(value: Any) -> tuple[TrustDomainConfig, ...]:
    entries = _list(value, "trust_domains")
    names: list[str] = []
    raw: list[tuple[str, Mapping[str, Any]]] = []
    for i, entry in enumerate(entries):
        key = f"trust_domains[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"expected a mapping with 'name', got {entry!r}", key=key)
        _only(entry, {"name", "federates_with"}, key)
        name = _domain_name(entry.get("name"), f"{key}.name")
        if name in names:
            raise ConfigError(f"{name!r} is listed twice", key=f"{key}.name")
        names.append(name)
        raw.append((key, entry))
    domains = []
    for (key, entry), name in zip(raw, names):
        partners = entry.get("federates_with", [])
        if not isinstance(partners, list):
            raise ConfigError(f"expected a list of trust domain names, got {partners!r}", key=f"{key}.federates_with")
        federates: list[str] = []
        for j, partner in enumerate(partners):
            pkey = f"{key}.federates_with[{j}]"
            partner_name = _domain_name(partner, pkey)
            if partner_name == name:
                raise ConfigError("a trust domain does not federate with itself", key=pkey)
            if partner_name not in names:
                raise ConfigError(f"{partner_name!r} is not one of the configured trust_domains", key=pkey)
            if partner_name not in federates:
                federates.append(partner_name)
        domains.append(TrustDomainConfig(name, tuple(federates)))
    return tuple(domains)


def _workloads(value: Any, domains: set[str], base: Path) -> tuple[WorkloadConfig, ...]:
    entries = _list(value, "workloads")
    workloads: list[WorkloadConfig] = []
    for i, entry in enumerate(entries):
        key = f"workloads[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"expected a mapping with name, spiffe_id and socket, got {entry!r}", key=key)
        _only(entry, {"name", "spiffe_id", "socket", "dns_names"}, key)
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
