"""The decision cache: the LRU, and every part of its key, in one place.

An entry is one policy answer, kept until its own deadline (the earliest of the cache TTL
and anything in the request that expires: token ``exp``, session expiry). Its key is the
policy's prefix (``policy_key_prefix``: version and query) followed by one of:

* ``full_key``: the request's fingerprint (``request_fingerprint``, made by the fronts
  from every non-volatile part of the request), the identity's (``identity_fingerprint``,
  made by the identity resolver), the volatile values the policy names, and the signal
  values it can read;
* ``read_key``: the digest of the projected input, when the policy reads only part of it;
* ``narrow_key``: the values at the policy's declared ``cache.key_paths``.

``ReadKeys`` remembers a request's ``read_key`` by its ``full_key``, so a request sent again
is found without projecting its input again.

The pipeline (``decision``) picks which and asks; this module imports nothing above the
plain vocabulary (facts, trees), so the fronts and identity can call it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, Iterable, Mapping, TypeVar

from .facts import Facts
from .trees import Tree, project, values_at

V = TypeVar("V")


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    invalidations: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class DecisionCache(Generic[V]):
    """The LRU of policy answers, each until its deadline.

    The deadlines live in a dict of their own (bytes to floats, which the cyclic garbage
    collector does not track) rather than in a tuple per entry: on traffic that does not repeat
    the cache fills to ``max_entries`` of long-lived objects, and a full collection walks every
    tracked one while holding the event loop (measured: 20,000 route-table entries, 67,000
    tracked objects, 26-55 ms a full collection; 100,000 entries would be several times that)."""

    __slots__ = ("max_entries", "_entries", "_deadlines", "stats")

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, V] = OrderedDict()
        self._deadlines: dict[bytes, float] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> V | None:
        value = self._entries.get(key)
        if value is None:
            self.stats.misses += 1
            return None
        if self._deadlines[key] <= now:
            del self._entries[key]
            del self._deadlines[key]
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return value

    def put(self, key: bytes, value: V, expires_at: float, now: float) -> None:
        if self.max_entries == 0 or expires_at <= now:
            return
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        self._deadlines[key] = expires_at
        while len(entries) > self.max_entries:
            oldest, _ = entries.popitem(last=False)
            del self._deadlines[oldest]
            self.stats.evictions += 1

    def clear(self) -> None:
        """Drop everything (policy or data changed)."""
        if self._entries:
            self._entries.clear()
            self._deadlines.clear()
        self.stats.invalidations += 1


# -- the key

def policy_key_prefix(version: str, query: str) -> bytes:
    """What every key of one policy version and query starts with (a new version clears the cache anyway)."""
    return hashlib.blake2b(f"{version}\0{query}".encode(), digest_size=16).digest()


def request_fingerprint(data: bytes) -> bytes:
    """A front's digest of the non-volatile parts of one request (``Facts.fingerprint``)."""
    return hashlib.blake2b(data, digest_size=20).digest()


def request_digest() -> "hashlib.blake2b":
    """The same digest, fed in parts (the HTTP front hashes its headers one by one)."""
    return hashlib.blake2b(digest_size=20)


def identity_fingerprint(method: str, workload: bytes, credential: bytes,
                         delegation: Iterable[Mapping[str, str]]) -> bytes:
    """A stable digest of a verified identity (``Identity.fingerprint``): how it was proven,
    the workload's and the session's (or token's) own fingerprints, the delegation chain."""
    digest = hashlib.blake2b(method.encode(), digest_size=16)
    digest.update(workload or b"-")
    digest.update(credential or b"-")
    for hop in delegation:
        digest.update(f"{hop.get('actor', '')}>{hop.get('on_behalf_of', '')};".encode())
    return digest.digest()


def token_fingerprint(token: str) -> bytes:
    """A presented token's part of the identity fingerprint, when no session stands for it."""
    return hashlib.blake2b(token.encode(), digest_size=16).digest()


def full_key(prefix: bytes, facts: Facts, identity_fingerprint: bytes, signals: Mapping[str, Any], *,
             volatile_tree: Tree | None, signal_paths: tuple[tuple[str, ...], ...] | None) -> bytes:
    # Fixed-width digests side by side (the identity's prefixed by its length): no ambiguity,
    # and no hashing on the hot path.
    key = prefix + facts.fingerprint + bytes((len(identity_fingerprint),)) + identity_fingerprint
    if volatile_tree is not None:
        # The fingerprint leaves out per-request fields (request id, time, port); this policy
        # names some of them, so its answers depend on them.
        named = project(facts.attributes(volatile_tree), volatile_tree)
        key += b"\x03" + hashlib.blake2b(json.dumps(named, sort_keys=True, separators=(",", ":")).encode(),
                                         digest_size=20).digest()
    if signals:
        # Only the signal fields the policy can read: a policy reading rate.limited keeps its
        # cache hits while the observed rate moves on every request.
        if signal_paths is None:
            key += hashlib.blake2b(json.dumps(signals, sort_keys=True, separators=(",", ":")).encode(),
                                   digest_size=20).digest()
        elif signal_paths:
            key += b"\x02" + repr(values_at(signals, signal_paths)).encode()
    return key


def read_key(prefix: bytes, input_json: bytes) -> bytes:
    """Keyed on the (projected) input the engine gets, as it gets it."""
    return prefix + hashlib.blake2b(input_json, digest_size=20).digest()


class ReadKeys:
    """Each request's ``read_key``, remembered by its ``full_key``: the same request from the
    same identity (a browser reloading a page, a client polling) finds its cache entry without
    building and encoding the projected input again. ``full_key`` covers everything a read key
    is made of (the request's non-volatile parts, the volatile values the policy names, the
    identity, the signals it reads), so one always stands for the other. Bounded: emptied when
    full or when the policy changes (the prefix is in both keys, so a stale entry could only
    miss, never answer wrongly)."""

    __slots__ = ("max_entries", "_keys")

    def __init__(self, max_entries: int = 16_384) -> None:
        self.max_entries = max_entries
        self._keys: dict[bytes, bytes] = {}

    def get(self, request_key: bytes) -> bytes | None:
        return self._keys.get(request_key)

    def put(self, request_key: bytes, read_key: bytes) -> None:
        keys = self._keys
        if len(keys) >= self.max_entries:
            keys.clear()
        keys[request_key] = read_key

    def clear(self) -> None:
        self._keys.clear()


def narrow_key(prefix: bytes, document: Mapping[str, Any], key_paths: Iterable[str]) -> bytes:
    """Keyed on the values at the policy's declared ``cache.key_paths`` only."""
    values = [_lookup(document, path) for path in key_paths]
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(prefix + b"\x01" + blob, digest_size=20).digest()


_MISSING = {"__missing__": True}


def _lookup(document: Mapping[str, Any], path: str) -> Any:
    node: Any = document
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


# -- how long an entry may live

class BearerExpiry:
    """The ``exp`` of a bearer JWT the policy may check itself (read unverified: it only
    shortens how long a decision is cached), remembered per payload: a client sends the same
    token many times. One per pipeline, bounded."""

    __slots__ = ("_by_payload",)

    def __init__(self) -> None:
        self._by_payload: dict[str, float | None] = {}

    def of(self, facts: Facts) -> float | None:
        header = facts.header("authorization")
        if not header[:7].lower() == "bearer ":
            return None
        parts = header[7:].strip().split(".")
        if len(parts) != 3 or len(parts[1]) > 16384:
            return None
        encoded = parts[1]
        known = self._by_payload
        if encoded in known:
            return known[encoded]
        try:
            payload = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
            exp = payload.get("exp") if isinstance(payload, dict) else None
            # The token is the caller's: an exp of 10**400 or a payload nested thousands deep must
            # not turn into an internal error (float() overflows, json.loads recurses).
            expiry = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
        except (ValueError, TypeError, OverflowError, RecursionError):
            expiry = None
        if len(known) >= 4096:
            known.clear()
        known[encoded] = expiry
        return expiry


__all__ = [
    "BearerExpiry", "CacheStats", "DecisionCache", "ReadKeys", "full_key", "identity_fingerprint", "narrow_key",
    "policy_key_prefix", "read_key", "request_digest", "request_fingerprint", "token_fingerprint",
]
