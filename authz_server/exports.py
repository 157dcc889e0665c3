"""A package's public names, imported only when first used (PEP 562).

A package ``__init__`` lists what it offers (``__all__``) without importing its modules:
importing one module of a package must not load the others. ``authz_server.policy`` would
otherwise load the OPA engine (a Go runtime, which must never be loaded in a process that
forks afterwards) for a tool that only reads a bundle's files.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: ``where`` maps each public name to the submodule
    (relative to ``package``) that defines it."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__


__all__ = ["lazy_exports"]
