"""A verified identity: what the identity phase hands the decision.

``IdentityService.resolve`` (``identity.resolver``) makes one per request from the
workload's certificate, the session or the token; the pipeline puts ``document`` into
``input.identity``, keys its cache on ``fingerprint`` (``decisioncache.identity_fingerprint``)
and never keeps a decision past ``expires_at``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

Headers = tuple[tuple[str, str], ...]

# The identity headers we own upstream: set by us (with overwrite) when the identity has a
# subject or a workload, and removed otherwise, so a client can never smuggle its own
# x-authz-subject to the upstream. Both fronts apply the rule (``upstream_removals``).
SUBJECT_HEADER = "x-authz-subject"
SPIFFE_ID_HEADER = "x-authz-spiffe-id"
IDENTITY_HEADERS = (SUBJECT_HEADER, SPIFFE_ID_HEADER)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, once verified. ``document`` is ``input.identity``."""

    document: Mapping[str, Any]
    fingerprint: bytes = b""  # stable digest of ``document`` (part of the cache key)
    expires_at: float | None = None  # no decision about this identity outlives it
    upstream_headers: Headers = ()  # e.g. x-authz-subject, x-authz-spiffe-id
    response_headers: Headers = ()  # to the client on allow, e.g. a new x-session-id
    headers_to_remove: tuple[str, ...] = ()  # e.g. the raw Authorization header


NO_IDENTITY = Identity({})


def upstream_removals(upstream: Headers, to_remove: tuple[str, ...]) -> list[str]:
    """The headers an allow removes from the request to the upstream: the ones asked for, and
    every identity header this answer does not set itself (names compare lowercased, as Envoy
    keeps them). In order, without repeats."""
    ours = {name.lower() for name, _ in upstream}
    return list(dict.fromkeys([*to_remove, *(h for h in IDENTITY_HEADERS if h not in ours)]))


__all__ = ["IDENTITY_HEADERS", "NO_IDENTITY", "SPIFFE_ID_HEADER", "SUBJECT_HEADER", "Identity", "upstream_removals"]
