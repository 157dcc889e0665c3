"""Sessions in Redis, shared by every replica, with a near-cache in each process.

The store is one Redis, a primary watched by Sentinel, or a Cluster (``sharedstate`` reads
the URL). Layout (all keys under ``authz:``; the braces are hash tags, so what one operation
touches stays in one Cluster slot; TTLs live in Redis itself, so idle sessions vanish there):
  ``s:{<key>}``       the session as JSON, expiring at its idle deadline or hard end
  ``r:{<key>}``       a tombstone after revocation, so the answer stays "revoked" (not "unknown")
  ``g:{<subject>}``   the subject's generation; bumping it revokes every older session
  ``j:{<iss> <jti>}`` which client first used a token (replay detection), until the token expires

A near-cache miss costs one round trip. With one server or Sentinel a script reads the
session, its tombstone and its subject's generation together. On a Cluster the generation
lives in its subject's slot: the script reads session and tombstone, and the generation
comes from this process's generation cache (kept current by the invalidation feed, trusted
only while the feed is live, like a near-cached session, and re-read after
``GENERATION_TRUST``), else a second trip.

Revocations are published on ``authz:invalidate`` (sharded pub/sub on a Cluster); every
replica drops its near-cached copy as the message arrives (milliseconds). Each time the
subscription is (re)established the whole near-cache is cleared: messages may have been
missed while it was down.

Durability: sessions, tombstones, generations and replay records are written with the
store's ``replica_acks`` (``WAIT``; 1 with Sentinel by default). A sign-in is answered only
once its session is on that many replicas, so a failover does not lose it.

The near-cache is trusted only while the feed is live; while it is down, lookups ask the
store (on a Cluster whose channel shard fails over, the other shards still answer).

If the store is unreachable (or fails over): creating a session fails closed
(``session_store_unavailable``); sessions in the near-cache keep working until their entry
expires; a revocation is enforced at once by the replica that took it, queued, and replayed
to the store (then published) as soon as the store answers. Everything recovers by itself:
redis-py reconnects (and finds the new primary) per command, the subscriber resubscribes
within 100 ms of the store answering again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ..errors import SessionError, UnavailableError
from ..sharedstate import STORE_ERRORS, SharedRedis, connect, tag
from ..tasks import cancel_all
from .sessions import Session, StoreStats

log = logging.getLogger("authz_server.sessions.redis")

CHANNEL = "authz:invalidate"
REPLAY_INTERVAL = 0.05  # how often queued revocations are retried while the store is away
RESUBSCRIBE_MAX_WAIT = 0.1
STORE_RETRY_AFTER = 0.05  # after a failed lookup, near-cached sessions are served without asking for this long
# Cluster: how long a subject's generation, once read, stands in for the store while the feed is
# live (every bump is published; a feed that breaks clears it). Longer than a session's
# near-cache entry: the sessions of one subject are many, its generation is one.
GENERATION_TRUST = 60.0

# Session, tombstone and the subject's generation in one round trip (one server or Sentinel:
# the generation key is named from the session, which a Cluster would refuse as cross-slot).
_LOOKUP = """
local s = redis.call('GET', KEYS[1])
if not s then
  return {false, redis.call('EXISTS', KEYS[2])}
end
local subject = cjson.decode(s)['subject']:gsub('{', '('):gsub('}', ')')
return {s, redis.call('GET', ARGV[1] .. subject .. '}') or '0'}
"""
# The same within the session's slot only (Cluster).
_LOOKUP_SLOT = """
local s = redis.call('GET', KEYS[1])
if not s then
  return {false, redis.call('EXISTS', KEYS[2])}
end
return {s, false}
"""
# Delete the session and leave a tombstone until it would have ended. ARGV[1]: now.
_REVOKE = """
local s = redis.call('GET', KEYS[1])
if not s then
  return 0
end
local ttl = math.floor((cjson.decode(s)['expires'] - tonumber(ARGV[1])) * 1000)
if ttl < 1 then ttl = 1 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ttl)
return 1
"""


# The first client to present a token owns it: nil for that first claim, else who claimed it.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
"""


def _session_key(key: str) -> str:
    return f"authz:s:{{{key}}}"


def _tombstone_key(key: str) -> str:
    return f"authz:r:{{{key}}}"


def _generation_key(subject: str) -> str:
    return f"authz:g:{tag(subject)}"


class RedisStore:
    def __init__(self, url: str, *, near_cache_ttl: float = 5.0, near_cache_entries: int = 100_000,
                 timeout: float = 0.25) -> None:
        self.url = url
        self.near_cache_ttl = near_cache_ttl
        self.near_cache_entries = near_cache_entries
        self._shared: SharedRedis = connect(url, timeout=timeout, key="sessions.store")
        self._client = self._shared.client
        self._cluster = self._shared.kind == "cluster"
        self._lookup_script = self._client.register_script(_LOOKUP_SLOT if self._cluster else _LOOKUP)
        # Oldest out first when full (ordered: a plain dict's first key is found by walking the
        # slots deleted at the front of its table, on the request path).
        self._near: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._generation_until: OrderedDict[str, float] = OrderedDict()  # Cluster: until when a cached generation is trusted
        # Revocations the store has not confirmed yet: enforced here meanwhile, replayed when it answers.
        self._pending_keys: dict[str, float] = {}
        self._pending_subjects: dict[str, float] = {}  # subject -> sessions created up to then are revoked
        self._pending_added = asyncio.Event()
        self._answered = asyncio.Event()  # a command succeeded: a waiting subscriber may retry now
        self._store_back = asyncio.Event()  # the same, for the queued revocations
        self._store_failed_until = 0.0
        self.resubscriptions = 0  # times the feed was (re)established
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()
        self.stats = StoreStats()
        self.invalidations = 0

    # -- life cycle
    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._listen(), name="sessions-invalidate"),
                           asyncio.create_task(self._replay_pending(), name="sessions-revocations")]

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self._shared.close()

    @property
    def pending_revocations(self) -> int:
        return len(self._pending_keys) + len(self._pending_subjects)

    async def _listen(self) -> None:
        backoff = 0.0
        failing = False
        while True:
            subscription = None
            try:
                subscription = await self._shared.subscription(CHANNEL)
                await subscription.start()
                while True:
                    event = await subscription.next(timeout=1.0)
                    if event is None:
                        continue
                    kind, data = event
                    if kind == "message":
                        self._apply(data)
                    elif kind == "subscribed":
                        # Anything published while we were not listening is lost: forget what we hold.
                        self._forget_cached()
                        self.subscribed.set()
                        self.resubscriptions += 1
                        backoff, failing = 0.0, False
                    else:  # the server dropped us (a Cluster slot moved): subscribe afresh
                        break
            except asyncio.CancelledError:
                raise
            except STORE_ERRORS as exc:
                if not failing:
                    log.warning("session invalidation feed lost (%s); resubscribing", exc)
                failing = True
            finally:
                self.subscribed.clear()
                if subscription is not None:
                    await subscription.close()
            self._answered.clear()
            try:
                await asyncio.wait_for(self._answered.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(max(backoff * 2, 0.01), RESUBSCRIBE_MAX_WAIT)

    @property
    def _epoch(self) -> int:
        """Moves on whatever may make a session read from the store stale (a feed message, a
        resubscription): a read begun before it is not remembered (see ``_remember``)."""
        return self.invalidations + self.resubscriptions

    def _forget_cached(self) -> None:
        self._near.clear()
        self._generations.clear()
        self._generation_until.clear()

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

    def _answering(self) -> None:
        """A store command succeeded: whatever waits for the store to come back may go now."""
        if not self.subscribed.is_set():
            self._answered.set()
        if self._pending_keys or self._pending_subjects:
            self._store_back.set()

    # -- near-cache
    def _remember(self, session: Session, now: float, epoch: int) -> None:
        """Near-cache ``session`` as read when the feed was at ``epoch``; not if it moved since: a
        revocation may have been announced (and applied here) while the read was under way, and
        the stale copy would then outlive it by up to ``near_cache_ttl``."""
        if epoch != self._epoch:
            return
        if len(self._near) >= self.near_cache_entries:
            self._near.popitem(last=False)
        self._near[session.key] = (session, now + self.near_cache_ttl)

    def _revoked_here(self, session: Session) -> bool:
        """Revoked by this replica while the store could not take it yet."""
        if session.key in self._pending_keys:
            return True
        at = self._pending_subjects.get(session.subject)
        return at is not None and session.created <= at

    def lookup_cached(self, key: str, *, now: float) -> Session | None:
        """The near-cached session if it may be used without asking the store: only while the
        invalidation feed is live (else a revocation made elsewhere could have been missed)."""
        entry = self._near.get(key)
        if entry is None or entry[1] <= now or not self.subscribed.is_set():
            return None
        session = entry[0]
        if (self._pending_keys or self._pending_subjects) and self._revoked_here(session):
            return None
        return session if session.alive(now, self._generations.get(session.subject, 0)) else None

    # -- the store
    async def create(self, session: Session, *, now: float) -> Session:
        ttl_ms = max(1, int((session.ends_at() - now) * 1000))
        key = _session_key(session.key)
        epoch = self._epoch
        try:
            generation = self._trusted_generation(session.subject, now)
            if generation is None:
                generation = int(await self._client.get(_generation_key(session.subject)) or 0)
            session = replace(session, generation=generation)
            text = session.to_json()
            await self._shared.durable(key, ("SET", key, text, "PX", ttl_ms))
        except STORE_ERRORS as exc:
            self.stats.errors += 1
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        self._answering()
        self._learn_generation(session.subject, generation, now)
        self.stats.created += 1
        self._remember(session, now, epoch)
        return session

    def _trusted_generation(self, subject: str, now: float) -> int | None:
        """Cluster: the subject's generation as this process knows it, when that may stand in
        for the store (the feed is live and it was read lately); else None."""
        if self._cluster and self._generation_until.get(subject, 0.0) > now and self.subscribed.is_set():
            return self._generations.get(subject, 0)
        return None

    def _learn_generation(self, subject: str, generation: int, now: float) -> None:
        self._generations[subject] = max(self._generations.get(subject, 0), generation)
        if self._cluster:
            if len(self._generation_until) >= self.near_cache_entries:
                stale, _ = self._generation_until.popitem(last=False)
                self._generations.pop(stale, None)
            self._generation_until[subject] = now + max(self.near_cache_ttl, GENERATION_TRUST)

    async def lookup(self, key: str, *, now: float) -> Session:
        """Near-cached while the invalidation feed is live. While it is down the store decides
        (on a Cluster the other shards still answer); only when the store cannot answer either
        does the near-cache, so sessions keep working through an outage until their entry ends."""
        self.stats.lookups += 1
        cached = self._near.get(key)
        if cached is not None and cached[1] <= now:
            cached = None
        if cached is not None and (self.subscribed.is_set() or now < self._store_failed_until):
            return await self._near_hit(cached[0], now)
        if self._pending_keys and key in self._pending_keys:
            raise SessionError("session was revoked", code="session_revoked")
        epoch = self._epoch
        try:
            found, second = await self._lookup_script(keys=[_session_key(key), _tombstone_key(key)],
                                                      args=["authz:g:{"])
            session = Session.from_json(found) if found else None
            if session is not None and self._cluster:
                second = self._trusted_generation(session.subject, now)
                if second is None:
                    second = await self._client.get(_generation_key(session.subject))
        except STORE_ERRORS as exc:
            self.stats.errors += 1
            # Do not try again for every request of a burst: each try can cost the socket timeout.
            self._store_failed_until = now + STORE_RETRY_AFTER
            if cached is not None:
                return await self._near_hit(cached[0], now)
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        self._answering()
        if session is None:
            self.stats.misses += 1
            if int(second or 0):
                raise SessionError("session was revoked", code="session_revoked")
            raise SessionError("unknown or expired session", code="session_unknown")
        if (self._pending_keys or self._pending_subjects) and self._revoked_here(session):
            raise SessionError("session was revoked", code="session_revoked")
        self._learn_generation(session.subject, int(second or 0), now)
        session.check_alive(now, self._generations[session.subject])
        self.stats.hits += 1
        if now - (session.last_seen or session.created) > session.idle_timeout / 10:
            touched = await self._touch(session, now)
            if touched is None:
                return session  # alive when read; the store decides the next lookup
            session = touched
        self._remember(session, now, epoch)
        return session

    async def _near_hit(self, session: Session, now: float) -> Session:
        if (self._pending_keys or self._pending_subjects) and self._revoked_here(session):
            raise SessionError("session was revoked", code="session_revoked")
        session.check_alive(now, self._generations.get(session.subject, 0))
        self.stats.near_hits += 1
        if now - (session.last_seen or session.created) > session.idle_timeout / 10:
            epoch = self._epoch
            touched = await self._touch(session, now)
            if touched is None:
                self._near.pop(session.key, None)
            elif touched is not session:
                self._remember(touched, now, epoch)
        return session

    async def _touch(self, session: Session, now: float) -> Session | None:
        """Keep an active session alive: rewrite it with a later idle deadline (at most every
        tenth of the idle timeout, not on every request). The session rewritten; ``session`` itself
        when the store could not take it (it stays valid, only its idle clock was not extended);
        None when the store no longer has it (revoked or ended since it was read: not to be kept)."""
        touched = session.touched(now)
        ttl_ms = max(1, int((touched.ends_at() - now) * 1000))
        try:
            written = await self._client.set(_session_key(session.key), touched.to_json(), px=ttl_ms, xx=True)
        except STORE_ERRORS:
            self.stats.errors += 1
            return session
        return touched if written else None

    # -- revocation
    async def revoke(self, key: str, *, now: float) -> bool:
        """True when a live session was revoked. While the store cannot take it, the revocation
        is enforced here, queued for the store, and True is returned: it will hold everywhere
        as soon as the store answers."""
        self._near.pop(key, None)
        try:
            found = await self._revoke_in_store(key, now)
        except STORE_ERRORS as exc:
            self.stats.errors += 1
            self._pending_keys[key] = now
            self._pending_added.set()
            log.warning("session store unreachable (%s): revocation of session %s enforced here, queued for "
                        "the store", exc, key[:16])
            self.stats.revoked += 1
            return True
        self.stats.revoked += found
        return found

    async def _revoke_in_store(self, key: str, now: float) -> bool:
        session, tombstone = _session_key(key), _tombstone_key(key)
        replies = await self._shared.durable(session, ("EVAL", _REVOKE, 2, session, tombstone, now))
        await self._shared.publish(CHANNEL, f"s {key}")
        self._answering()
        return bool(int(replies[0]))

    async def revoke_subject(self, subject: str) -> int:
        """The subject's new generation. While the store cannot take it, every session of the
        subject made so far is refused here, the revocation is queued for the store, and the
        generation returned is this replica's best knowledge plus one."""
        try:
            generation = await self._bump_generation(subject)
        except STORE_ERRORS as exc:
            self.stats.errors += 1
            self._pending_subjects[subject] = time.time()
            self._pending_added.set()
            log.warning("session store unreachable (%s): revocation of every session of %s enforced here, "
                        "queued for the store", exc, subject)
            self.stats.revoked += 1
            return self._generations.get(subject, 0) + 1
        self.stats.revoked += 1
        return generation

    async def _bump_generation(self, subject: str) -> int:
        """INCR, not idempotent: a retry after a lost reply may bump twice, which at worst also
        revokes a session signed in between (fail closed)."""
        key = _generation_key(subject)
        generation = int((await self._shared.durable(key, ("INCR", key)))[0])
        self._generations[subject] = max(self._generations.get(subject, 0), generation)
        await self._shared.publish(CHANNEL, f"g {subject} {generation}")
        self._answering()
        return generation

    async def _replay_pending(self) -> None:
        while True:
            await self._pending_added.wait()
            self._pending_added.clear()
            while self._pending_keys or self._pending_subjects:
                # All at once (each is idempotent): a failover leaves a batch, and every one of
                # them should hold everywhere as soon as the store is back.
                keys, subjects = list(self._pending_keys.items()), list(self._pending_subjects.items())
                results = await asyncio.gather(*(self._revoke_in_store(key, time.time()) for key, _at in keys),
                                               *(self._bump_generation(subject) for subject, _at in subjects),
                                               return_exceptions=True)
                for (key, at), result in zip(keys, results):
                    if not isinstance(result, BaseException) and self._pending_keys.get(key) == at:
                        del self._pending_keys[key]
                        log.info("queued revocation of session %s applied to the store", key[:16])
                for (subject, at), result in zip(subjects, results[len(keys):]):
                    if not isinstance(result, BaseException) and self._pending_subjects.get(subject) == at:
                        del self._pending_subjects[subject]
                        log.info("queued revocation of every session of %s applied to the store", subject)
                for result in results:
                    if isinstance(result, Exception) and not isinstance(result, STORE_ERRORS):
                        log.error("replaying a queued revocation failed (kept, retried): %r", result)
                if self._pending_keys or self._pending_subjects:
                    # Again after a while, or as soon as another command finds the store back.
                    self._store_back.clear()
                    try:
                        await asyncio.wait_for(self._store_back.wait(), REPLAY_INTERVAL)
                    except asyncio.TimeoutError:
                        pass

    # -- replay records and listing
    async def claim_jti(self, issuer: str, jti: str, client: str, *, until: float, now: float) -> str | None:
        key = f"authz:j:{tag(f'{issuer} {jti}')}"
        ttl_ms = max(1000, int((until - now) * 1000))
        try:
            (first,) = await self._shared.durable(key, ("EVAL", _CLAIM, 1, key, client, ttl_ms))
        except STORE_ERRORS as exc:
            self.stats.errors += 1
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        if first is None:
            return None
        first_client = first.decode() if isinstance(first, bytes) else str(first or "")
        if first_client != client:
            self.stats.replays += 1
        return first_client or None

    async def sessions(self, *, subject: str | None = None, now: float) -> list[Session]:
        found: list[Session] = []
        try:
            async for key in self._client.scan_iter(match="authz:s:{*", count=1000):
                raw = await self._client.get(key)
                if raw:
                    session = Session.from_json(raw)
                    if subject is None or session.subject == subject:
                        found.append(session)
        except STORE_ERRORS as exc:
            raise UnavailableError(f"session store unreachable: {exc}", code="session_store_unavailable") from None
        return found


__all__ = ["CHANNEL", "RedisStore"]
