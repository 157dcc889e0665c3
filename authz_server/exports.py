"""A package's public names, imported only when first used (PEP 562).

A package ``__init__`` lists what it offers (``__all__``) without importing its modules:
importing one module of a package must not load the others. ``authz_server.policy`` would
otherwise load the OPA engine (a Go runtime, which must never be loaded in a process that
forks afterwards) for a tool that only reads a bundle's files.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping


def lazy_exports(package: str, modules: Mapping[str, Iterable[str]]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: ``modules`` maps each submodule (relative to
    ``package``) to the public names it defines, as the package's ``TYPE_CHECKING``
    imports list them for readers and type checkers."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__


__all__ = ["lazy_exports"]
