"""Reading a configuration mapping: the one unknown-key check and the generic value readers.

Every configuration reader (``config``, ``signals``, ``identity``, ``bundles.config``,
``workload.config``, ``devidp.config``) checks its keys with ``only`` and reads plain values
with these helpers, so an unknown key is refused in one way everywhere and every error
names the key it is about (``ConfigError(key=…)``). It imports nothing of the package but
``errors``: the readers of each part sit above it, never beside each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError


def show(value: Any) -> str:
    """A value as an error message quotes it: its type and a bounded repr."""
    return f"{type(value).__name__} {value!r}"[:80]


def only(data: Mapping[str, Any], allowed: set[str] | frozenset[str], prefix: str,
         unsupported: Mapping[str, str] | None = None) -> None:
    """Refuse any key of ``data`` not in ``allowed``; ``prefix`` is the path of ``data``
    (``"signals.rate."``, or ``""`` at the top). The error suggests the allowed key that
    starts alike, else lists them; a key in ``unsupported`` (an OPA setting we do not
    offer) is refused with the reason given there."""
    for name in data:
        if unsupported and name in unsupported:
            raise ConfigError(f"not supported by authz-server: {unsupported[name]}", key=f"{prefix}{name}")
        if name not in allowed:
            close = sorted(a for a in allowed if a[:3] == str(name)[:3])
            hint = f" (did you mean {close[0]!r}?)" if close else f"; expected one of {', '.join(sorted(allowed))}"
            raise ConfigError(f"unknown key{hint}", key=f"{prefix}{name}")


def resolve_path(value: str, base_dir: str | None) -> str:
    """Config-relative first, then the working directory."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute() or base_dir is None:
        return str(path)
    beside = Path(base_dir) / path
    if beside.exists() or not path.exists():
        return str(beside)
    return str(path)


def string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {show(value)}", key=key)
    return value


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {show(value)}", key=key)
    return value


def mapping(value: Any, key: str) -> Mapping[str, Any]:
    """A mapping, or ``{}`` for an absent (null) section."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {show(value)}", key=key)
    return value


def readable_file(path: str, key: str) -> str:
    try:
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key=key) from None


__all__ = ["boolean", "mapping", "only", "readable_file", "resolve_path", "show", "string"]
