"""Checked readers for identity's config sections (issuers, DPoP, introspection, browser
sign-in): each names the key it reads in its ``ConfigError``."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..configkeys import only
from ..durations import parse_duration
from ..errors import ConfigError

_LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url(value: Any, key: str, *, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a URL, got {value!r}", key=key)
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{what} must be an https URL, got {value!r}", key=key)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(f"{what} must use https (plain http only to a loopback address), got {value!r}", key=key)
    if parts.query or parts.fragment:
        # OpenID Connect Discovery 1.0 §2: the issuer is a URL "with no query or fragment components"
        raise ConfigError(f"{what} must not have a query or fragment, got {value!r}", key=key)
    return value


def strings(value: Any, key: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(f"expected a list of non-empty strings, got {value!r}", key=key)
    if not items and not allow_empty:
        raise ConfigError("must list at least one value", key=key)
    return tuple(items)


def seconds(value: Any, key: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key) from None


def int_between(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"expected an integer between {low} and {high}, got {value!r}", key=key)
    return value


def path(value: Any, key: str, base_dir: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a file path, got {value!r}", key=key)
    found = Path(os.path.expanduser(value))
    if not found.is_absolute() and base_dir is not None:
        beside = Path(base_dir) / found
        if beside.exists() or not found.exists():
            found = beside
    return str(found)


def section(data: Any, key: str, allowed: set[str], required: tuple[str, ...], what: str) -> Mapping[str, Any]:
    """A config mapping with only ``allowed`` keys and each ``required`` one a non-empty string."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping with {what}, got {data!r}", key=key)
    only(data, allowed, f"{key}.")
    for name in required:
        if not isinstance(data.get(name), str) or not data[name]:
            raise ConfigError("is required", key=f"{key}.{name}")
    return data


def seconds_between(value: Any, key: str, low: float, high: float, text: str) -> float:
    result = seconds(value, key)
    if not low <= result <= high:
        raise ConfigError(f"must be between {text}", key=key)
    return result
