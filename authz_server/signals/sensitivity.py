"""Route sensitivity: how strong an identity a route demands.

It comes from the route itself: Envoy's per-route ``context_extensions`` (``sensitivity``)
in gRPC mode, or the ``x-authz-ctx-sensitivity`` header Envoy adds in HTTP mode (the HTTP
front maps both to the same place). Absent means the configured default; a value that is
not ``low``, ``medium`` or ``high`` means ``high``: a typo must not weaken a route.
"""

from __future__ import annotations

from typing import Mapping

LEVELS = ("low", "medium", "high")


def sensitivity_of(context_extensions: Mapping[str, str], default: str = "medium") -> str:
    value = context_extensions.get("sensitivity")
    if value is None:
        return default
    return value if value in LEVELS else "high"
