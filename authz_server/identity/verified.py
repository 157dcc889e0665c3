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

__all__ = ["NO_IDENTITY", "Identity"]
