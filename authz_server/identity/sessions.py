"""Token-less sessions: the JWT is validated once, then an opaque id stands for it.

A session id is 256 random bits (never derived from the token), given to the client once.
Stores keep only its SHA-256, so a copy of the store holds no usable id. A session is
bound to the client that created it (SPIFFE ID and/or certificate thumbprint, optionally
the user agent), ends after ``idle_timeout`` without use or at ``expires`` at the latest,
and can be revoked alone or with every session of its subject (a per-subject generation
counter: sessions older than the subject's current generation are dead).

``SessionStore`` is the seam: ``MemoryStore`` here for one process, ``RedisStore`` for
several replicas.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Protocol

from ..errors import ReplayError, SessionError, UnavailableError

SESSION_ID_BYTES = 32
_ID_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def new_session_id() -> str:
    return base64.urlsafe_b64encode(os.urandom(SESSION_ID_BYTES)).rstrip(b"=").decode("ascii")


def session_key(session_id: str) -> str:
    """What stores index by: the id itself is never kept."""
    if not _ID_SHAPE.match(session_id):
        raise SessionError("session id is not 43 base64url characters", code="malformed_session_id")
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True)
class Binding:
    """The client a session belongs to.

    The SPIFFE ID and certificate must be the same on both sides, absent included: a session
    made by a client without a workload identity (a browser, curl) presented by a workload
    is that workload acting for the user, never the same client. The user agent is checked
    only when the session was bound to one (``sessions.bind_user_agent``)."""

    spiffe_id: str = ""
    cert_sha256: str = ""
    user_agent_sha256: str = ""

    def matches(self, client: "Binding") -> bool:
        return (self.spiffe_id == client.spiffe_id
                and self.cert_sha256 == client.cert_sha256
                and (not self.user_agent_sha256 or self.user_agent_sha256 == client.user_agent_sha256))

    def describe(self) -> str:
        parts = [f"spiffe_id={self.spiffe_id}" if self.spiffe_id else "",
                 f"cert={self.cert_sha256[:16]}" if self.cert_sha256 else "",
                 f"ua={self.user_agent_sha256[:12]}" if self.user_agent_sha256 else ""]
        return " ".join(p for p in parts if p) or "anonymous client"

    def to_input(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v}


@dataclass(frozen=True, slots=True)
class Session:
    key: str  # sha256 of the id
    subject: str
    issuer: str
    claims: Mapping[str, Any]  # the subset of token claims policies see
    created: float
    expires: float  # hard end
    idle_timeout: float
    binding: Binding
    generation: int  # the subject's generation when the session was made
    jti: str = ""
    last_seen: float = 0.0
    delegation: tuple[Mapping[str, str], ...] = ()  # act chain carried from token exchange
    jkt: str = ""  # made from a DPoP-bound token: every use proves possession of this key (RFC 9449)
    fingerprint: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            blob = json.dumps([self.key, self.subject, self.issuer, self.claims, self.created, self.expires,
                               self.binding.to_input(), list(self.delegation), self.jkt], sort_keys=True,
                              default=str)
            object.__setattr__(self, "fingerprint", hashlib.blake2b(blob.encode(), digest_size=16).digest())

    def idle_deadline(self) -> float:
        return (self.last_seen or self.created) + self.idle_timeout

    def ends_at(self) -> float:
        return min(self.expires, self.idle_deadline())

    def check_alive(self, now: float, current_generation: int) -> None:
        if now >= self.expires:
            raise SessionError("session reached its maximum lifetime", code="session_expired")
        if now >= self.idle_deadline():
            raise SessionError("session expired after being idle", code="session_expired")
        if self.generation < current_generation:
            raise SessionError("every session of this subject was revoked", code="session_revoked")

    def alive(self, now: float, current_generation: int) -> bool:
        """``check_alive`` as a test: for caches that answer only what they are sure of."""
        return now < self.expires and now < self.idle_deadline() and self.generation >= current_generation

    def to_input(self) -> dict[str, Any]:
        """``input.identity.session``: never the id itself."""
        return {"id_sha256": self.key, "created": self.created, "expires": self.expires,
                "bound_to": self.binding.to_input()}

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("fingerprint")
        data["binding"] = asdict(self.binding)
        data["delegation"] = [dict(d) for d in self.delegation]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Session":
        data = json.loads(text)
        data["binding"] = Binding(**data["binding"])
        data["delegation"] = tuple(data.get("delegation", ()))
        return cls(**data)

    def touched(self, now: float) -> "Session":
        return replace(self, last_seen=now, fingerprint=self.fingerprint)


class SessionStore(Protocol):
    """Where sessions live. Lookups raise ``SessionError`` (unknown, expired, revoked) or
    ``UnavailableError`` when the store cannot answer."""

    async def create(self, session: Session, *, now: float) -> Session:
        """Store ``session`` stamped with its subject's current generation; returns it."""
        ...

    async def lookup(self, key: str, *, now: float) -> Session: ...

    def lookup_cached(self, key: str, *, now: float) -> Session | None:
        """A lookup that never waits (in-process state only); None when it cannot tell."""
        ...

    async def revoke(self, key: str, *, now: float) -> bool: ...

    async def revoke_subject(self, subject: str) -> int: ...

    async def claim_jti(self, issuer: str, jti: str, client: str, *, until: float, now: float) -> str | None:
        """Record that ``client`` used token ``jti`` (until the token expires). Returns None
        for the first use, else the client that used it first (the caller judges a replay)."""
        ...

    async def sessions(self, *, subject: str | None = None, now: float) -> list[Session]: ...

    async def close(self) -> None: ...


@dataclass
class StoreStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    near_hits: int = 0
    created: int = 0
    revoked: int = 0
    replays: int = 0
    errors: int = 0


class MemoryStore:
    """One process's sessions, in dicts. Expired entries are swept as they are met and by
    a periodic pass, so memory stays bounded by the sessions actually alive."""

    def __init__(self, *, max_sessions: int = 1_000_000) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._revoked: dict[str, float] = {}  # key -> until when to say "revoked" rather than "unknown"
        self._generations: dict[str, int] = {}
        self._jtis: dict[tuple[str, str], tuple[str, float]] = {}
        self._last_sweep = 0.0
        self.stats = StoreStats()

    async def create(self, session: Session, *, now: float) -> Session:
        self._sweep(now)
        if len(self._sessions) >= self.max_sessions:
            raise UnavailableError(f"session store full ({self.max_sessions} live sessions)",
                                   code="session_store_full")
        session = replace(session, generation=self._generations.get(session.subject, 0))
        self._sessions[session.key] = session
        self.stats.created += 1
        return session

    def lookup_cached(self, key: str, *, now: float) -> Session | None:
        session = self._sessions.get(key)
        if session is None or not session.alive(now, self._generations.get(session.subject, 0)):
            return None
        return session

    async def lookup(self, key: str, *, now: float) -> Session:
        self.stats.lookups += 1
        session = self._sessions.get(key)
        if session is None:
            self.stats.misses += 1
            if key in self._revoked and self._revoked[key] > now:
                raise SessionError("session was revoked", code="session_revoked")
            raise SessionError("unknown session", code="session_unknown")
        try:
            session.check_alive(now, self._generations.get(session.subject, 0))
        except SessionError:
            del self._sessions[session.key]
            self.stats.misses += 1
            raise
        self.stats.hits += 1
        if now - (session.last_seen or session.created) > session.idle_timeout / 10:
            # The idle clock moves in steps of a tenth of the timeout: no new object per request.
            session = session.touched(now)
            self._sessions[key] = session
        return session

    async def revoke(self, key: str, *, now: float) -> bool:
        session = self._sessions.pop(key, None)
        if session is None:
            return False
        self._revoked[key] = session.expires
        self.stats.revoked += 1
        return True

    async def revoke_subject(self, subject: str) -> int:
        generation = self._generations.get(subject, 0) + 1
        self._generations[subject] = generation
        self.stats.revoked += 1
        return generation

    async def claim_jti(self, issuer: str, jti: str, client: str, *, until: float, now: float) -> str | None:
        key = (issuer, jti)
        existing = self._jtis.get(key)
        if existing is not None and existing[1] > now:
            if existing[0] != client:
                self.stats.replays += 1
            return existing[0]
        self._jtis[key] = (client, until)
        return None

    async def sessions(self, *, subject: str | None = None, now: float) -> list[Session]:
        self._sweep(now, force=True)
        return [s for s in self._sessions.values() if subject is None or s.subject == subject]

    def _sweep(self, now: float, *, force: bool = False) -> None:
        if not force and now - self._last_sweep < 30:
            return
        self._last_sweep = now
        for key, session in list(self._sessions.items()):
            if now >= session.ends_at():
                del self._sessions[key]
        for key, until in list(self._revoked.items()):
            if until <= now:
                del self._revoked[key]
        for jti_key, (_client, until) in list(self._jtis.items()):
            if until <= now:
                del self._jtis[jti_key]

    async def close(self) -> None:
        self._sessions.clear()


async def mint_session(store: "SessionStore", *, subject: str, issuer: str, claims: Mapping[str, Any],
                       binding: Binding, now: float, expires: float, idle_timeout: float, jti: str = "",
                       delegation: tuple[Mapping[str, str], ...] = (), jkt: str = "") -> tuple[str, Session]:
    """Where every session is minted: a new random id, given to the client once, and the
    session stored under its digest. Returns ``(id, session)``. ``claims`` are the ones the
    policy may read (the caller filters them); nothing of the token itself is kept."""
    new_id = new_session_id()
    session = Session(
        key=session_key(new_id), subject=subject, issuer=issuer, claims=dict(claims), created=now, expires=expires,
        idle_timeout=idle_timeout, binding=binding, generation=0, jti=jti, last_seen=now,
        delegation=delegation, jkt=jkt,
    )
    return new_id, await store.create(session, now=now)


def replay_error(issuer: str, jti: str, first: str, second: str) -> ReplayError:
    return ReplayError(f"{describe_token(issuer, jti)} was first used by {first}, now presented by {second}",
                       code="token_replay")


def describe_token(issuer: str, jti: str) -> str:
    return f"token {jti!r} from {issuer}" if jti else f"a token without jti from {issuer}"


__all__ = ["Binding", "MemoryStore", "Session", "SessionStore", "StoreStats", "describe_token", "new_session_id",
           "replay_error", "session_key", "sha256_hex"]
