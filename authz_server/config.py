"""One typed configuration: a YAML file, then command-line flags on top.

Every key is checked at start; a bad one stops the start with one line that names it
(``config error: decision_cache.ttl: expected a duration like '90s' ...``). Unknown keys
are errors too: a typo must not silently fall back to a default. Relative paths are taken
from the config file's folder, or the working directory when they are not found there.

Sections owned by other parts of the product parse themselves (``from_mapping``); this
module only composes them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping


from .configkeys import boolean as _bool
from .configkeys import mapping as _mapping
from .configkeys import only as _only
from .configkeys import readable_file as _readable_file
from .configkeys import resolve_path
from .configkeys import show as _show
from .configkeys import string as _string
from .decision import DecisionSettings
from .identity.browser import BrowserLoginConfig
from .identity.exchange import ExchangeConfig, ExchangeRule
from .identity.oidc import parse_issuers
from .identity.resolver import TOKENS_WITHOUT_JTI, SessionSettings
from .policy.engine import validate_query
from .policy.pool import ISOLATION_MODES
from .sharedstate import parse_store_url
from .signals import SignalsConfig
from .durations import parse_duration
from .errors import ConfigError, PolicyError
from .limits import Limits
from .yamlfile import read_yaml_file

if TYPE_CHECKING:
    from .bundles.config import ControlPlane

DEFAULT_QUERY = "data.envoy.authz.allow"


@dataclass(frozen=True)
class TlsConfig:
    """mTLS on the ext_authz gRPC port and the admin port."""

    spiffe_socket: str = ""  # SVID and bundles from the Workload API, or the three files:
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    allowed_clients: tuple[str, ...] = ()  # SPIFFE IDs (or spiffe://domain/*) admitted; empty: any valid cert


@dataclass(frozen=True)
class AdminConfig:
    addr: str = ""  # off unless set; always mTLS
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class SessionsConfig:
    settings: SessionSettings = field(default_factory=SessionSettings)
    store: str = "memory"  # or a shared-state URL: redis://, redis+sentinel://, redis+cluster:// (sharedstate)
    near_cache_ttl: float = 5.0


@dataclass(frozen=True)
class ShutdownConfig:
    """On SIGTERM: NOT_SERVING at once, still answering for ``drain_delay`` (so health checks
    and load balancers move traffic away first), then up to ``grace`` for the checks in flight."""

    drain_delay: float = 0.0
    grace: float = 10.0


@dataclass(frozen=True)
class Config:
    addr: str = "127.0.0.1:9191"
    http_addr: str = ""
    http_path_prefix: str = "/check"  # what Envoy's http_service.path_prefix puts before the path
    policies: str = "policies/"
    query: str = DEFAULT_QUERY
    metrics_addr: str = "127.0.0.1:9464"
    workers: int = 0  # 0: decide at start (see serve.resolve_workers)
    log_level: str = "info"
    policy_isolation: str = "thread"  # thread | inline (see policy.pool); "adaptive" is read as thread
    policy_threads: int = 0  # evaluation threads per process; 0: a process's share of the cores less one
    strict_builtin_errors: bool = False  # OPA's default: a failing built-in makes its expression undefined
    decision: DecisionSettings = field(default_factory=DecisionSettings)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    trust_domains: tuple[str, ...] = ()
    issuers: tuple[Any, ...] = ()  # identity.oidc.IssuerConfig, one per trusted issuer
    tls: TlsConfig | None = None
    admin: AdminConfig = field(default_factory=AdminConfig)
    exchange: ExchangeConfig | None = None
    browser_login: BrowserLoginConfig | None = None
    signals: SignalsConfig | None = None
    audit: tuple[str, ...] = ()
    control_plane: ControlPlane | None = None  # OPA's services/bundles/decision_logs/status, and shadow
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    limits: Limits = field(default_factory=Limits)
    source: str = ""  # the file this came from, for messages

    def with_overrides(self, **overrides: Any) -> "Config":
        known = {f.name for f in fields(self)}
        clean = {k: v for k, v in overrides.items() if v is not None and k in known}
        return replace(self, **clean)


# -- small checked readers: each names the key it reads

def check_query(value: Any, key: str) -> str:
    try:
        return validate_query(_string(value, key))
    except PolicyError as exc:
        raise ConfigError(exc.message, key=key) from None


def _address(value: Any, key: str, *, allow_empty: bool = True) -> str:
    text = _string(value, key).strip()
    if not text:
        if allow_empty:
            return ""
        raise ConfigError("must not be empty", key=key)
    if text.startswith("unix:"):
        if len(text) == len("unix:"):
            raise ConfigError("unix: address needs a path", key=key)
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port or unix:/path, got {text!r}", key=key)
    return text


def _int(value: Any, key: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected an integer, got {_show(value)}", key=key)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"must be {bounds}, got {value}", key=key)
    return value


def _duration(value: Any, key: str, *, positive: bool = True) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key) from None
    if not math.isfinite(seconds):  # "nan", ".inf", "1e999": a cache entry that never expires
        raise ConfigError(f"expected a finite duration like '90s', got {value!r}", key=key)
    if positive and seconds <= 0:
        raise ConfigError(f"must be greater than zero, got {value!r}", key=key)
    return seconds


def _decision_settings(data: Mapping[str, Any], defaults: DecisionSettings) -> DecisionSettings:
    cache = _mapping(data.get("decision_cache"), "decision_cache")
    _only(cache, {"max_entries", "ttl", "clock_ttl"}, "decision_cache.")
    settings = defaults
    if "max_entries" in cache:
        settings = replace(settings, cache_max_entries=_int(cache["max_entries"], "decision_cache.max_entries"))
    if "ttl" in cache:
        settings = replace(settings, cache_ttl=_duration(cache["ttl"], "decision_cache.ttl"))
    if "clock_ttl" in cache:
        settings = replace(settings, clock_ttl=_duration(cache["clock_ttl"], "decision_cache.clock_ttl"))
    if "policy_timeout" in data:
        settings = replace(settings, policy_timeout=_duration(data["policy_timeout"], "policy_timeout"))
    if "deny_status" in data:
        settings = replace(settings, deny_status=_int(data["deny_status"], "deny_status", minimum=400, maximum=599))
    if "dry_run" in data:
        settings = replace(settings, dry_run=_bool(data["dry_run"], "dry_run"))
    if "deny_body" in data:
        explain = _choice(data["deny_body"], "deny_body", ("policy", "explain")) == "explain"
        settings = replace(settings, explain_policy_denies=explain)
    return settings


_LOG_LEVELS = {"debug", "info", "warning", "error"}

# Top-level keys, each with its reader: (value, base_dir) -> dict of Config fields.
_Reader = Callable[[Any, "str | None"], dict[str, Any]]
_READERS: dict[str, _Reader] = {
    "addr": lambda v, _b: {"addr": _address(v, "addr")},
    "http_addr": lambda v, _b: {"http_addr": _address(v, "http_addr")},
    "http_path_prefix": lambda v, _b: {"http_path_prefix": _path_prefix(v)},
    "policies": lambda v, b: {"policies": resolve_path(_string(v, "policies"), b)},
    "query": lambda v, _b: {"query": check_query(v, "query")},
    "metrics_addr": lambda v, _b: {"metrics_addr": _address(v, "metrics_addr")},
    "workers": lambda v, _b: {"workers": _int(v, "workers", minimum=1, maximum=1024)} if v != "auto" else {},
    "log_level": lambda v, _b: {"log_level": _log_level(v)},
    "policy_isolation": lambda v, _b: {"policy_isolation": _isolation(v)},
    "policy_threads": lambda v, _b: {"policy_threads": _int(v, "policy_threads", minimum=1, maximum=256)}
    if v != "auto" else {},
    "strict_builtin_errors": lambda v, _b: {"strict_builtin_errors": _bool(v, "strict_builtin_errors")},
    "audit": lambda v, b: {"audit": _audit_sinks(v, b)},
    "sessions": lambda v, _b: {"sessions": _sessions(v)},
    "tls": lambda v, b: {"tls": _tls(v, b)},
    "issuers": lambda v, b: {"issuers": parse_issuers(v, base_dir=b)},
    "exchange": lambda v, b: {"exchange": _exchange(v, b)},
    "browser_login": lambda v, b: {"browser_login": BrowserLoginConfig.from_mapping(v, base_dir=b)},
    "signals": lambda v, b: {"signals": SignalsConfig.from_mapping(v, base_dir=b)},
    "admin": lambda v, _b: {"admin": _admin(v)},
    "trust_domains": lambda v, _b: {"trust_domains": _trust_domains(v)},
    "shutdown": lambda v, _b: {"shutdown": _shutdown(v)},
    "limits": lambda v, _b: {"limits": _limits(v)},
}
_DECISION_KEYS = {"decision_cache", "policy_timeout", "deny_status", "dry_run", "deny_body"}


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"expected a list of strings, got {_show(value)}", key=key)
    return tuple(_string(item, f"{key}[{i}]") for i, item in enumerate(items))


def _trust_domains(value: Any) -> tuple[str, ...]:
    domains = _string_list(value, "trust_domains")
    for index, domain in enumerate(domains):
        if not domain or domain != domain.lower() or domain.startswith("spiffe://") or "/" in domain:
            raise ConfigError(f"expected a trust domain name like example.org, got {domain!r}",
                              key=f"trust_domains[{index}]")
    return domains


def _spiffe_patterns(value: Any, key: str) -> tuple[str, ...]:
    patterns = _string_list(value, key)
    for index, pattern in enumerate(patterns):
        if not pattern.startswith("spiffe://"):
            raise ConfigError(f"expected a SPIFFE ID or spiffe://domain/* pattern, got {pattern!r}",
                              key=f"{key}[{index}]")
    return patterns


def _tls(value: Any, base_dir: str | None) -> TlsConfig:
    data = _mapping(value, "tls")
    _only(data, {"spiffe_socket", "cert_file", "key_file", "ca_file", "allowed_clients"}, "tls.")
    files = {k: _readable_file(resolve_path(_string(data[k], f"tls.{k}"), base_dir), f"tls.{k}")
             for k in ("cert_file", "key_file", "ca_file") if k in data}
    socket = _string(data.get("spiffe_socket", ""), "tls.spiffe_socket")
    if socket and files:
        raise ConfigError("give either spiffe_socket or cert_file/key_file/ca_file, not both", key="tls")
    if not socket and len(files) != 3:
        missing = sorted({"cert_file", "key_file", "ca_file"} - set(files))
        raise ConfigError(f"needs spiffe_socket, or all of cert_file, key_file and ca_file (missing: "
                          f"{', '.join(missing)})", key="tls")
    allowed = _spiffe_patterns(data["allowed_clients"], "tls.allowed_clients") if "allowed_clients" in data else ()
    return TlsConfig(spiffe_socket=socket, allowed_clients=allowed, **files)


def _exchange(value: Any, base_dir: str | None) -> ExchangeConfig:
    data = _mapping(value, "exchange")
    _only(data, {"addr", "issuer", "ttl", "key_file", "rules", "trust_forwarded_client_cert"}, "exchange.")
    addr = _address(data.get("addr", ""), "exchange.addr", allow_empty=False)
    values: dict[str, Any] = {"addr": addr}
    if "issuer" in data:
        issuer = _string(data["issuer"], "exchange.issuer")
        if not issuer.startswith("https://"):
            raise ConfigError(f"expected an https URL naming this token issuer, got {issuer!r}", key="exchange.issuer")
        values["issuer"] = issuer
    if "ttl" in data:
        values["ttl"] = _duration(data["ttl"], "exchange.ttl")
    if "key_file" in data:
        values["key_file"] = resolve_path(_string(data["key_file"], "exchange.key_file"), base_dir)
    if "trust_forwarded_client_cert" in data:
        values["trust_forwarded_client_cert"] = _bool(data["trust_forwarded_client_cert"],
                                                      "exchange.trust_forwarded_client_cert")
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ConfigError("list who may exchange tokens for which audiences", key="exchange.rules")
    parsed = []
    for index, rule in enumerate(rules):
        key = f"exchange.rules[{index}]"
        rule = _mapping(rule, key)
        _only(rule, {"actor", "audiences", "scopes"}, f"{key}.")
        actor = _spiffe_patterns([rule.get("actor", "")], f"{key}.actor")[0]
        audiences = _string_list(rule.get("audiences", []), f"{key}.audiences")
        if not audiences:
            raise ConfigError("name at least one audience", key=f"{key}.audiences")
        parsed.append(ExchangeRule(actor, audiences, _string_list(rule.get("scopes", []), f"{key}.scopes")))
    values["rules"] = tuple(parsed)
    return ExchangeConfig(**values)


def _shutdown(value: Any) -> ShutdownConfig:
    data = _mapping(value, "shutdown")
    _only(data, {"drain_delay", "grace"}, "shutdown.")
    values = {name: _duration(data[name], f"shutdown.{name}", positive=False) for name in ("drain_delay", "grace")
              if name in data}
    for name, seconds in values.items():
        if not 0 <= seconds <= 600:
            raise ConfigError(f"must be between 0s and 10m, got {data[name]!r}", key=f"shutdown.{name}")
    return ShutdownConfig(**values)


def _admin(value: Any) -> AdminConfig:
    data = _mapping(value, "admin")
    _only(data, {"addr", "allowed"}, "admin.")
    allowed = _spiffe_patterns(data.get("allowed", []), "admin.allowed")
    addr = _address(data.get("addr", ""), "admin.addr")
    if addr and not allowed:
        raise ConfigError("list the SPIFFE IDs allowed to use the admin API", key="admin.allowed")
    return AdminConfig(addr=addr, allowed=allowed)


def _sessions(value: Any) -> SessionsConfig:
    data = _mapping(value, "sessions")
    _only(data, {"enabled", "store", "idle_timeout", "max_lifetime", "near_cache_ttl", "bind_user_agent",
                 "outlive_token", "cookie", "delegation", "claims", "one_time_use_issuers", "tokens_without_jti"},
          "sessions.")
    settings = SessionSettings()
    changes: dict[str, Any] = {}
    if "enabled" in data:
        changes["enabled"] = _bool(data["enabled"], "sessions.enabled")
    if "idle_timeout" in data:
        changes["idle_timeout"] = _duration(data["idle_timeout"], "sessions.idle_timeout")
    if "max_lifetime" in data:
        changes["max_lifetime"] = _duration(data["max_lifetime"], "sessions.max_lifetime")
    if "bind_user_agent" in data:
        changes["bind_user_agent"] = _bool(data["bind_user_agent"], "sessions.bind_user_agent")
    if "outlive_token" in data:
        changes["outlive_token"] = _bool(data["outlive_token"], "sessions.outlive_token")
    if "cookie" in data:
        cookie = _string(data["cookie"], "sessions.cookie")
        if not cookie.startswith("__Host-"):
            raise ConfigError("the session cookie must use the __Host- prefix (Secure, Path=/, no Domain)",
                              key="sessions.cookie")
        changes["cookie"] = cookie
    if "claims" in data:
        changes["claims"] = _string_list(data["claims"], "sessions.claims")
    if "one_time_use_issuers" in data:
        changes["one_time_use_issuers"] = _string_list(data["one_time_use_issuers"], "sessions.one_time_use_issuers")
    if "tokens_without_jti" in data:
        changes["tokens_without_jti"] = _choice(data["tokens_without_jti"], "sessions.tokens_without_jti",
                                                TOKENS_WITHOUT_JTI)
    delegation = _mapping(data.get("delegation"), "sessions.delegation")
    _only(delegation, {"actors", "max_hops"}, "sessions.delegation.")
    if "actors" in delegation:
        actors = _string_list(delegation["actors"], "sessions.delegation.actors")
        for index, actor in enumerate(actors):
            if not actor.startswith("spiffe://"):
                raise ConfigError(f"expected a SPIFFE ID or spiffe://domain/* pattern, got {actor!r}",
                                  key=f"sessions.delegation.actors[{index}]")
        changes["delegation_actors"] = actors
    if "max_hops" in delegation:
        changes["max_delegation_hops"] = _int(delegation["max_hops"], "sessions.delegation.max_hops", minimum=1,
                                              maximum=16)
    store = "memory"
    if "store" in data:
        store = _string(data["store"], "sessions.store")
        if store != "memory":
            parse_store_url(store, key="sessions.store")
    near = _duration(data["near_cache_ttl"], "sessions.near_cache_ttl") if "near_cache_ttl" in data else 5.0
    if changes.get("idle_timeout", settings.idle_timeout) > changes.get("max_lifetime", settings.max_lifetime):
        raise ConfigError("idle_timeout is longer than max_lifetime", key="sessions.idle_timeout")
    return SessionsConfig(settings=replace(settings, **changes), store=store, near_cache_ttl=near)


def _limits(value: Any) -> Limits:
    data = _mapping(value, "limits")
    sizes = {"max_header_bytes": (1024, 16 * 1024 * 1024), "max_headers": (16, 10_000),
             "max_body_bytes": (0, 64 * 1024 * 1024), "max_connections": (16, 1_000_000)}
    timeouts = ("header_timeout", "body_timeout", "idle_timeout")
    _only(data, {*sizes, *timeouts}, "limits.")
    changes: dict[str, Any] = {name: _int(data[name], f"limits.{name}", minimum=low, maximum=high)
                               for name, (low, high) in sizes.items() if name in data}
    changes.update({name: _duration(data[name], f"limits.{name}") for name in timeouts if name in data})
    return Limits(**changes)


def _path_prefix(value: Any) -> str:
    text = _string(value, "http_path_prefix")
    if text and (not text.startswith("/") or text.endswith("/")):
        raise ConfigError(f"expected a path like /check (leading slash, no trailing slash), got {text!r}",
                          key="http_path_prefix")
    return text


def _isolation(value: Any) -> str:
    # "adaptive" (evaluate inline once a policy proved fast) was dropped with regopy: a policy
    # that once ran long must never run on the event loop, and threads now cost little. Configs
    # that name it keep working, on threads.
    return "thread" if value == "adaptive" else _choice(value, "policy_isolation", ISOLATION_MODES)


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    text = _string(value, key)
    if text not in choices:
        raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", key=key)
    return text


def _log_level(value: Any) -> str:
    text = _string(value, "log_level").lower()
    if text not in _LOG_LEVELS:
        raise ConfigError(f"expected one of {sorted(_LOG_LEVELS)}, got {value!r}", key="log_level")
    return text


def _audit_sinks(value: Any, base_dir: str | None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError("expected a list of sinks (stdout, file:PATH, postgresql://...)", key="audit")
    sinks = []
    for index, item in enumerate(items):
        sink = _string(item, f"audit[{index}]")
        if sink.startswith("file:"):
            sink = "file:" + resolve_path(sink[5:], base_dir)
        elif sink != "stdout" and not sink.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"unknown sink {sink!r}: use stdout, file:PATH or postgresql://...", key=f"audit[{index}]")
        sinks.append(sink)
    return tuple(sinks)


def config_from_mapping(data: Mapping[str, Any], *, base_dir: str | None = None, source: str = "") -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config must be a mapping of keys, got {_show(data)}")
    from .bundles.config import CONTROL_PLANE_KEYS, parse_control_plane  # it reads with this module's readers

    _only(data, set(_READERS) | _DECISION_KEYS | set(CONTROL_PLANE_KEYS), "")
    values: dict[str, Any] = {"source": source}
    for key, reader in _READERS.items():
        if key in data:
            values.update(reader(data[key], base_dir))
    values["control_plane"] = parse_control_plane(data, base_dir)
    values["decision"] = _decision_settings(data, DecisionSettings())
    config = Config(**values)
    if config.admin.addr and config.tls is None:
        raise ConfigError("the admin API is served over mTLS only: configure tls", key="admin.addr")
    if config.browser_login is not None:
        if config.browser_login.issuer not in {issuer.issuer for issuer in config.issuers}:
            raise ConfigError("must be one of the issuers (their keys verify the ID tokens)", key="browser_login.issuer")
        if not config.sessions.settings.enabled:
            raise ConfigError("browser sign-in makes sessions: sessions.enabled must be true", key="browser_login")
    if config.exchange is not None and config.tls is None and not config.exchange.trust_forwarded_client_cert:
        raise ConfigError("the actor is known by its client certificate: configure tls, or "
                          "trust_forwarded_client_cert behind a sidecar", key="exchange")
    return config


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read the YAML file (or defaults when ``path`` is None)."""
    if path is None:
        return Config()
    file = Path(path)
    return config_from_mapping(read_yaml_file(file), base_dir=str(file.parent), source=str(file))
