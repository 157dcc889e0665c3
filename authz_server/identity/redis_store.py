"""Sessions in Redis, shared by every replica, with a near-cache in each process.

Layout (all keys under ``authz:``; TTLs live in Redis itself, so idle sessions vanish there):
  ``s:<key>``      the session as JSON, expiring at its idle deadline or hard end
  ``r:<key>``      a tombstone after revocation, so the answer stays "revoked" (not "unknown")
  ``g:<subject>``  the subject's generation; bumping it revokes every older session
  ``j:<iss>:<jti>`` which client first used a token (replay detection), until the token expires

Revocations are published on ``authz:invalidate``; every replica drops its near-cached copy
as the message arrives (milliseconds). A replica whose subscription breaks clears its whole
near-cache on reconnect, since it may have missed messages.

If Redis is unreachable: creating a session fails closed (``session_store_unavailable``),
sessions still in the near-cache keep working until their near-cache entry expires, and
everything recovers by itself when Redis answers again (redis-py reconnects per command;
the subscriber loop retries with backoff).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import SessionError, UnavailableError
from .sessions import Session, StoreStats

log = logging.getLogger("authz_server.sessions.redis")

CHANNEL = "authz:invalidate"

# Session and subject generation in one round trip.
_LOOKUP = """
local s = redis.call('GET', KEYS[1])
if not s then
  return {false, redis.call('EXISTS', KEYS[2])}
end
local subject = cjson.decode(s)['subject']
return {s, redis.call('GET', ARGV[1] .. subject) or '0'}
"""


class RedisStore:
    def __init__(self, url: str, *, near_cache_ttl: float = 5.0, near_cache_entries: int = 100_000,
                 timeout: float = 0.25) -> None:
        self.url = url
        self.near_cache_ttl = near_cache_ttl
        self.near_cache_entries = near_cache_entries
        # One immediate retry on a broken connection: after Redis restarts, pooled connections
        # are stale and the first command on each would fail although Redis is back.
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 1),
                                            retry_on_error=[RedisConnectionError, RedisTimeoutError],
                                            health_check_interval=0)
        self._lookup_script = self._client.register_script(_LOOKUP)
        self._near: dict[str, tuple[Session, float]] = {}
        self._generations: dict[str, int] = {}
        self._subscriber: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self.stats = StoreStats()
        self.invalidations = 0

    # -- life cycle
    async def start(self) -> None:
        if self._subscriber is None:
            self._subscriber = asyncio.create_task(self._listen(), name="sessions-invalidate")

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            try:
                await self._subscriber
            except (asyncio.CancelledError, Exception):
                pass
            self._subscriber = None
        await self._client.aclose()

    async def _listen(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                # Anything published while we were not listening is lost: forget what we hold.
                self._near.clear()
                self._generations.clear()
                self.subscribed.set()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._apply(message.get("data", b""))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("session invalidation feed lost (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    def _apply(self, data: Any) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        kind, _, rest = text.partition(" ")
        self.invalidations += 1
        if kind == "s":
            self._near.pop(rest, None)
        elif kind == "g":
            subject, _, generation = rest.rpartition(" ")
            if generation.isdigit():
                self._generations[subject] = max(self._generations.get(subject, 0), int(generation))

    # -- near-cache
    def _remember(self, session: Session, now: float) -> None:
        if len(self._near) >= self.near_cache_entries:
            self._near.pop(next(iter(self._near)))
        self._near[session.key] = (session, now + self.near_cache_ttl)

    def lookup_cached(self, key: str, *, now: float) -> Session | None:
        entry = self._near.get(key)
        if entry is None or entry[1] <= now:
            return None
        session = entry[0]
        try:
            session.check_alive(now, self._generations.get(session.subject, 0))
        except SessionError:
            return None
        return session

    # -- the store
    async def create(self, session: Session, *, now: float) -> Session:
        ttl_ms = max(1, int((session.ends_at() - now) * 1000))
        try:
            generation = int(await self._client.get(f"authz:g:{session.subject}") or 0)
            session = replace(session, generation=generation)
            await self._client.set(f"authz:s:{session.key}", session.to_json(), px=ttl_ms)
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        self._generations[session.subject] = max(self._generations.get(session.subject, 0), generation)
        self.stats.created += 1
        self._remember(session, now)
        return session

    async def lookup(self, key: str, *, now: float) -> Session:
        self.stats.lookups += 1
        cached = self._near.get(key)
        if cached is not None and cached[1] > now:
            session = cached[0]
            session.check_alive(now, self._generations.get(session.subject, 0))
            self.stats.near_hits += 1
            if now - (session.last_seen or session.created) > session.idle_timeout / 10:
                await self._touch(session, now)
            return session
        try:
            found, second = await self._lookup_script(keys=[f"authz:s:{key}", f"authz:r:{key}"], args=["authz:g:"])
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        if not found:
            self.stats.misses += 1
            if int(second or 0):
                raise SessionError("session was revoked", code="session_revoked")
            raise SessionError("unknown or expired session", code="session_unknown")
        session = Session.from_json(found)
        generation = int(second or 0)
        self._generations[session.subject] = max(self._generations.get(session.subject, 0), generation)
        session.check_alive(now, generation)
        self.stats.hits += 1
        if now - (session.last_seen or session.created) > session.idle_timeout / 10:
            session = await self._touch(session, now)
        self._remember(session, now)
        return session

    async def _touch(self, session: Session, now: float) -> Session:
        """Keep an active session alive: rewrite it with a later idle deadline (at most every
        tenth of the idle timeout, not on every request)."""
        touched = session.touched(now)
        ttl_ms = max(1, int((touched.ends_at() - now) * 1000))
        try:
            await self._client.set(f"authz:s:{session.key}", touched.to_json(), px=ttl_ms, xx=True)
        except (RedisError, OSError):
            self.stats.errors += 1
            return session  # the session stays valid; only its idle clock was not extended
        self._remember(touched, now)
        return touched

    async def revoke(self, key: str, *, now: float) -> bool:
        try:
            found = await self._client.get(f"authz:s:{key}")
            if not found:
                return False
            session = Session.from_json(found)
            ttl_ms = max(1, int((session.expires - now) * 1000))
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(f"authz:s:{key}")
                pipe.set(f"authz:r:{key}", "1", px=ttl_ms)
                pipe.publish(CHANNEL, f"s {key}")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        self._near.pop(key, None)
        self.stats.revoked += 1
        return True

    async def revoke_subject(self, subject: str) -> int:
        try:
            generation = int(await self._client.incr(f"authz:g:{subject}"))
            await self._client.publish(CHANNEL, f"g {subject} {generation}")
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        self._generations[subject] = max(self._generations.get(subject, 0), generation)
        self.stats.revoked += 1
        return generation

    async def claim_jti(self, issuer: str, jti: str, client: str, *, until: float, now: float) -> str | None:
        key = f"authz:j:{issuer}:{jti}"
        ttl_ms = max(1000, int((until - now) * 1000))
        try:
            if await self._client.set(key, client, nx=True, px=ttl_ms):
                return None
            first = await self._client.get(key)
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        first_client = first.decode() if isinstance(first, bytes) else str(first or "")
        if first_client != client:
            self.stats.replays += 1
        return first_client or None

    async def sessions(self, *, subject: str | None = None, now: float) -> list[Session]:
        found: list[Session] = []
        try:
            async for key in self._client.scan_iter(match="authz:s:*", count=1000):
                raw = await self._client.get(key)
                if raw:
                    session = Session.from_json(raw)
                    if subject is None or session.subject == subject:
                        found.append(session)
        except (RedisError, OSError) as exc:
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        return found


__all__ = ["CHANNEL", "RedisStore"]
