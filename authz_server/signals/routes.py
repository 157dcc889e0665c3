"""Route keys: one name for every request that hits the same endpoint.

``/orders/123`` and ``/orders/124`` are the same endpoint, so the per-route rate bucket and
the anomaly detector's "new (method, route)" test must see one key, not one per id. A path
becomes a route key by:

1. dropping the query string (``?...``) and fragment;
2. replacing every segment that looks like an identifier with ``{id}``: all digits
   (``123``), a UUID (``0b7f...-...``), a hex string of 16+ characters (hashes, object ids),
   or a token of 24+ URL-safe characters that contains a digit (opaque ids such as
   ``ord_8Zk2LmQ9...``);
3. truncating to ``MAX_ROUTE_LENGTH`` characters, since the path is untrusted input and the
   key is stored (memory, Redis).

Results are cached in a small bounded dict (cleared when full) because the same few raw
paths dominate traffic; a cache miss costs one regular-expression substitution.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ROUTE_LENGTH", "ID_PLACEHOLDER", "RouteNormalizer", "normalize_route"]

MAX_ROUTE_LENGTH = 256
ID_PLACEHOLDER = "{id}"

_ID_SEGMENT = re.compile(
    r"/(?:"
    r"\d+"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{16,}"
    r"|(?=[A-Za-z_~-]*\d)[A-Za-z0-9_~-]{24,}"
    r")(?=/|$)"
)


def normalize_route(path: str) -> str:
    """The route key of ``path`` (uncached; see the module docstring for the rules)."""
    end = len(path)
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut != -1 and cut < end:
            end = cut
    route = _ID_SEGMENT.sub("/" + ID_PLACEHOLDER, path[:end] if end != len(path) else path)
    if len(route) > MAX_ROUTE_LENGTH:
        route = route[:MAX_ROUTE_LENGTH]
    return route or "/"


class RouteNormalizer:
    """``normalize_route`` behind a bounded cache; one per ``Signals`` (no global state)."""

    __slots__ = ("_cache", "_max_entries")

    def __init__(self, max_entries: int = 8192) -> None:
        self._cache: dict[str, str] = {}
        self._max_entries = max_entries

    def __call__(self, path: str) -> str:
        route = self._cache.get(path)
        if route is None:
            route = normalize_route(path)
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            # Cache only bounded-size keys: a huge raw path must not pin a huge string.
            if len(path) <= 2 * MAX_ROUTE_LENGTH:
                self._cache[path] = route
        return route
