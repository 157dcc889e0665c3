"""The dev OIDC provider's YAML config: issuer, demo users and clients, token and key lifetimes.

::

    addr: 127.0.0.1:9400              # where to listen (port 0: any free port)
    issuer: http://127.0.0.1:9400     # default: http://{bound address}
    algorithms: [RS256, ES256]        # a signing key is kept for each
    default_algorithm: RS256          # clients may choose another with 'algorithm'
    token_ttl: 5m
    key_rotation: 24h                 # 0 or absent: never rotate
    key_publish_ahead: 10m            # a new key is in the JWKS this long before it signs
    jwks_max_age: 5m                  # Cache-Control max-age on the JWKS
    users:
      - username: alice
        password: alice-password      # plain text: this is a development tool
        subject: alice                # default: the username
        claims: {roles: [customer], groups: [eu]}
    clients:
      - client_id: frontend
        client_secret: frontend-secret
        grants: [password, client_credentials]
        audiences: [orders-api]
        scopes: [orders:read, orders:write]
        algorithm: ES256              # optional
        claims: {roles: [service]}    # added to its client_credentials tokens
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


from ..configkeys import only as _only
from ..durations import parse_duration
from ..errors import ConfigError
from ..yamlfile import read_yaml_file

SIGNING_ALGORITHMS = ("RS256", "ES256")
GRANTS = ("client_credentials", "password")
# Claims the provider sets itself; configured claims may not override them.
RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "auth_time",
                             "cnf", "act", "may_act"})


@dataclass(frozen=True, slots=True)
class DemoUser:
    username: str
    password: str = field(repr=False)
    subject: str
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DemoClient:
    client_id: str
    client_secret: str = field(repr=False)
    grants: tuple[str, ...]
    audiences: tuple[str, ...]
    scopes: tuple[str, ...] = ()
    algorithm: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DevIdPConfig:
    addr: str = "127.0.0.1:9400"
    issuer: str | None = None
    algorithms: tuple[str, ...] = SIGNING_ALGORITHMS
    default_algorithm: str = "RS256"
    token_ttl: float = 300.0
    key_rotation: float = 0.0
    key_publish_ahead: float = 600.0
    jwks_max_age: float = 300.0
    users: tuple[DemoUser, ...] = ()
    clients: tuple[DemoClient, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "DevIdPConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"the dev IdP config must be a mapping, got {data!r}")
        allowed = {"addr", "issuer", "algorithms", "default_algorithm", "token_ttl", "key_rotation",
                   "key_publish_ahead", "jwks_max_age", "users", "clients"}
        _only(data, allowed, "")
        values: dict[str, Any] = {}
        if "addr" in data:
            values["addr"] = _text(data["addr"], "addr")
        if data.get("issuer") is not None:
            issuer = _text(data["issuer"], "issuer").rstrip("/")
            if not issuer.startswith(("http://", "https://")):
                raise ConfigError(f"expected an http(s) URL, got {issuer!r}", key="issuer")
            values["issuer"] = issuer
        if "algorithms" in data:
            algs = _texts(data["algorithms"], "algorithms")
            for alg in algs:
                if alg not in SIGNING_ALGORITHMS:
                    raise ConfigError(f"{alg!r} is not one of {', '.join(SIGNING_ALGORITHMS)}", key="algorithms")
            values["algorithms"] = algs
        algorithms = values.get("algorithms", SIGNING_ALGORITHMS)
        default = data.get("default_algorithm", algorithms[0])
        if default not in algorithms:
            raise ConfigError(f"{default!r} is not in algorithms {list(algorithms)}", key="default_algorithm")
        values["default_algorithm"] = default
        for name in ("token_ttl", "key_rotation", "key_publish_ahead", "jwks_max_age"):
            if name in data:
                try:
                    values[name] = parse_duration(data[name])
                except ValueError as exc:
                    raise ConfigError(str(exc), key=name) from None
        if values.get("token_ttl", 300.0) <= 0:
            raise ConfigError("must be positive", key="token_ttl")
        rotation = values.get("key_rotation", 0.0)
        if rotation and values.get("key_publish_ahead", 600.0) >= rotation:
            raise ConfigError("must be shorter than key_rotation", key="key_publish_ahead")
        values["users"] = tuple(_user(u, f"users[{i}]") for i, u in enumerate(_list(data.get("users", []), "users")))
        values["clients"] = tuple(_client(c, f"clients[{i}]", algorithms)
                                  for i, c in enumerate(_list(data.get("clients", []), "clients")))
        for kind, items, name in (("users", values["users"], "username"), ("clients", values["clients"], "client_id")):
            seen: set[str] = set()
            for i, item in enumerate(items):
                value = getattr(item, name)
                if value in seen:
                    raise ConfigError(f"{value!r} is listed twice", key=f"{kind}[{i}].{name}")
                seen.add(value)
        return cls(**values)


def load_devidp_config(path: str | os.PathLike[str]) -> DevIdPConfig:
    return DevIdPConfig.from_mapping(read_yaml_file(path))


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {value!r}", key=key)
    return value


def _texts(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"expected a non-empty list of strings, got {value!r}", key=key)
    return tuple(_text(item, f"{key}[{i}]") for i, item in enumerate(items))


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"expected a list, got {value!r}", key=key)
    return value


def _claims(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping of claim names to values, got {value!r}", key=key)
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"claim names are strings, got {name!r}", key=key)
        if name in RESERVED_CLAIMS:
            raise ConfigError(f"{name!r} is set by the provider itself", key=f"{key}.{name}")
    return MappingProxyType(dict(value))


def _user(data: Any, key: str) -> DemoUser:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {data!r}", key=key)
    _only(data, {"username", "password", "subject", "claims"}, f"{key}.")
    username = _text(data.get("username"), f"{key}.username")
    return DemoUser(username=username, password=_text(data.get("password"), f"{key}.password"),
                    subject=_text(data.get("subject", username), f"{key}.subject"),
                    claims=_claims(data.get("claims", {}), f"{key}.claims"))


def _client(data: Any, key: str, algorithms: tuple[str, ...]) -> DemoClient:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, got {data!r}", key=key)
    _only(data, {"client_id", "client_secret", "grants", "audiences", "scopes", "algorithm", "claims"}, f"{key}.")
    grants = _texts(data.get("grants", ["client_credentials"]), f"{key}.grants")
    for grant in grants:
        if grant not in GRANTS:
            raise ConfigError(f"{grant!r} is not one of {', '.join(GRANTS)}", key=f"{key}.grants")
    algorithm = data.get("algorithm")
    if algorithm is not None and algorithm not in algorithms:
        raise ConfigError(f"{algorithm!r} is not in algorithms {list(algorithms)}", key=f"{key}.algorithm")
    client_id = _text(data.get("client_id"), f"{key}.client_id")
    if ":" in client_id:
        raise ConfigError("must not contain ':' (it separates id and secret in client_secret_basic)",
                          key=f"{key}.client_id")
    return DemoClient(
        client_id=client_id, client_secret=_text(data.get("client_secret"), f"{key}.client_secret"),
        grants=grants, audiences=_texts(data.get("audiences"), f"{key}.audiences"),
        scopes=_texts(data["scopes"], f"{key}.scopes") if "scopes" in data else (),
        algorithm=algorithm, claims=_claims(data.get("claims", {}), f"{key}.claims"),
    )
