"""Kill the store's primary under steady traffic and account for every request.

Three replicas (``RedisStore``s, each with its own connections, near-cache and subscription)
take sign-ins (session creations), session calls (lookups) and revocations, all the time.
At ``kill_after`` the primary is killed. The report says how long sign-ins were refused
(the window: from the kill until the store is back, a sign-in accepted by every replica and
every replica subscribed to the revocation feed again), how
many were, whether any session the store had acknowledged was lost, whether anything was
allowed that should have been denied, and how long after the store was back every replica
denied each revocation issued during the window. Used by the integration test (which
asserts) and by ``make bench`` (which reports).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from authz_server.errors import SessionError, UnavailableError
from authz_server.identity.redis_store import RedisStore
from authz_server.identity.sessions import Binding, Session, new_session_id, session_key

PROPAGATION = 0.2  # a revocation made this long before a lookup elsewhere must be known there
TIMED_REVOCATIONS = 5
NEAR_CACHE_TTL = 5.0  # the longest a replica trusts a session it looked up without asking again


@dataclass
class FailoverReport:
    window_s: float = float("nan")
    sign_ins: int = 0
    refused_sign_ins: int = 0
    refusals_outside_window: list[str] = field(default_factory=list)  # when, and why
    session_calls: int = 0
    session_calls_unavailable: int = 0
    acknowledged: int = 0
    lost: int = 0
    revocations: int = 0
    revocations_in_window: int = 0
    wrongly_allowed: int = 0
    allowed_by_revoker: int = 0  # of those, by the replica that took the revocation (no timing involved)
    latest_allow_elsewhere_s: float = 0.0  # after a revocation the store had, how late another replica allowed it
    lag_ms: list[float] = field(default_factory=list)  # per timed revocation issued in the window
    window_revocations_not_enforced: int = 0  # at the end of the run, on some replica

    @property
    def refused_outside_window(self) -> int:
        return len(self.refusals_outside_window)

    @property
    def max_lag_ms(self) -> float:
        return max(self.lag_ms) if self.lag_ms else 0.0

    def lines(self) -> list[list[str]]:
        return [
            ["sign-ins refused / attempted", f"{self.refused_sign_ins} / {self.sign_ins}"],
            ["failover window (kill → store back)", f"{self.window_s * 1000:.0f} ms"],
            ["sign-ins refused outside the window", "; ".join([str(self.refused_outside_window),
                                                               *self.refusals_outside_window])],
            ["session calls unavailable / made", f"{self.session_calls_unavailable} / {self.session_calls}"],
            ["acknowledged sessions lost", f"{self.lost} of {self.acknowledged}"],
            ["revocations (in the window)", f"{self.revocations} ({self.revocations_in_window})"],
            ["requests allowed that should have been denied", str(self.wrongly_allowed)],
            ["revocation enforced on every replica after the store is back (max)",
             f"{self.max_lag_ms:.0f} ms" if self.lag_ms else "-"],
            ["revocations of the window not enforced everywhere at the end", str(self.window_revocations_not_enforced)],
        ]


def _session(subject: str, now: float) -> Session:
    sid = new_session_id()
    return Session(key=session_key(sid), subject=subject, issuer="https://idp.test", claims={"sub": subject},
                   created=now, expires=now + 3600, idle_timeout=600,
                   binding=Binding(spiffe_id="spiffe://example.org/frontend"), generation=0, last_seen=now)


async def failover_under_traffic(url: str, kill: Callable[[], None], *, replicas: int = 3, kill_after: float = 1.5,
                                 settle_after: float = 2.0, timeout: float = 60.0, seed: int = 1,
                                 store_timeout: float = 0.25) -> FailoverReport:
    rng = random.Random(seed)
    stores = [RedisStore(url, near_cache_ttl=NEAR_CACHE_TTL, timeout=store_timeout) for _ in range(replicas)]
    for store in stores:
        await store.start()
    await asyncio.wait_for(asyncio.gather(*(s.subscribed.wait() for s in stores)), 15)
    report = FailoverReport()
    live: list[str] = []
    revoked: dict[str, tuple[float, int, bool]] = {}  # key -> (when revoke returned, by which replica, in window)
    acknowledged: list[str] = []
    killed_at: float | None = None
    dead_at: float | None = None  # the kill returned: the old primary takes no write from here on
    back_at: float | None = None  # the store is back: sign-ins accepted and every replica's feed re-established
    feeds: list[int] = []
    revoking: set[str] = set()  # revocations under way
    # The replicas that signed someone in once the old primary was dead: only the new primary
    # (with a replica acknowledging) took those. A sign-in between the kill's start and the
    # process's death still lands on the old primary, and must not count as "back".
    written_since_death: set[int] = set()
    stop = asyncio.Event()

    async def sign_ins() -> None:
        nonlocal back_at
        index = 0
        while not stop.is_set():
            index += 1
            store = stores[index % replicas]
            started = time.monotonic()
            report.sign_ins += 1
            try:
                session = await store.create(_session(f"user{index % 200}", time.time()), now=time.time())
            except UnavailableError as exc:
                report.refused_sign_ins += 1
                if killed_at is None or (back_at is not None and started > back_at):
                    since = ("before the kill" if killed_at is None
                             else f"{(started - killed_at) * 1000:.0f} ms after the kill")
                    report.refusals_outside_window.append(f"{since}: {exc.message}")
            else:
                live.append(session.key)
                acknowledged.append(session.key)
                if dead_at is not None and started > dead_at:
                    written_since_death.add(index % replicas)
                # Back for every replica, not just the one that wrote first: each finds the new
                # primary on its own (its sentinel query, its reconnect), a moment apart.
                if killed_at is not None and back_at is None and len(written_since_death) == replicas and all(
                        s.subscribed.is_set() and s.resubscriptions > before for s, before in zip(stores, feeds)):
                    back_at = time.monotonic()
            await asyncio.sleep(0.01)

    async def session_calls() -> None:
        while not stop.is_set():
            if not live:
                await asyncio.sleep(0.005)
                continue
            pool = live if rng.random() < 0.7 or not revoked else list(revoked)
            key = rng.choice(pool)
            replica = rng.randrange(replicas)
            started = time.monotonic()
            report.session_calls += 1
            try:
                await stores[replica].lookup(key, now=time.time())
            except SessionError:
                pass
            except UnavailableError:
                report.session_calls_unavailable += 1
            else:
                if key in revoked:
                    at, by, in_window = revoked[key]
                    by_revoker = replica == by and started > at
                    report.allowed_by_revoker += by_revoker
                    if by_revoker or (not in_window and started > at + PROPAGATION):
                        report.wrongly_allowed += 1
                    if replica != by and not in_window:
                        report.latest_allow_elsewhere_s = max(report.latest_allow_elsewhere_s, started - at)
            await asyncio.sleep(0)

    async def revocations() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.1)
            if len(live) < 10:
                continue
            key = live.pop(rng.randrange(len(live)))
            by = rng.randrange(replicas)
            started = time.monotonic()
            revoking.add(key)
            await stores[by].revoke(key, now=time.time())
            # Issued during the failover: it ended after the kill (one in flight when the primary
            # died is as unknown to the other replicas) and began before the store was back.
            in_window = killed_at is not None and (back_at is None or started < back_at)
            revoked[key] = (time.monotonic(), by, in_window)
            revoking.discard(key)
            report.revocations += 1
            report.revocations_in_window += in_window

    tasks = [asyncio.create_task(t()) for t in (sign_ins, session_calls, session_calls, revocations)]
    try:
        await asyncio.sleep(kill_after)
        acknowledged_before = list(acknowledged)
        feeds[:] = [s.resubscriptions for s in stores]
        killed_at = time.monotonic()
        await asyncio.to_thread(kill)
        dead_at = time.monotonic()
        deadline = killed_at + timeout
        while back_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sign-in was accepted within {timeout:.0f}s of the kill")
            await asyncio.sleep(0.005)
        report.window_s = back_at - killed_at
        # How long after the store was back every replica denies a revocation issued in the
        # window: timed on a few of them (the revocations are replayed together; asking about
        # all of them at once on this small machine would time the asking), then every one of
        # them checked once the run settles.
        timed = [key for key, (_at, _by, in_window) in revoked.items() if in_window][:TIMED_REVOCATIONS]
        while timed and time.monotonic() < back_at + 10:
            answers = await asyncio.gather(*(denies(store, key) for key in timed for store in stores))
            elapsed = (time.monotonic() - back_at) * 1000
            done = [key for index, key in enumerate(timed) if all(answers[index * replicas:(index + 1) * replicas])]
            report.lag_ms.extend(elapsed for _ in done)
            timed = [key for key in timed if key not in done]
            await asyncio.sleep(0.002)
        report.lag_ms.extend(float("inf") for _ in timed)
        await asyncio.sleep(settle_after)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Every revocation issued in the window holds on every replica now.
    for key, (_at, _by, in_window) in revoked.items():
        if in_window and not all(await asyncio.gather(*(denies(store, key) for store in stores))):
            report.window_revocations_not_enforced += 1
    # What the store still has, read without any near-cache.
    auditor = RedisStore(url, near_cache_ttl=0.0)
    try:
        report.acknowledged = len(acknowledged_before)
        for key in acknowledged_before:
            try:
                await auditor.lookup(key, now=time.time())
            except SessionError as exc:
                if exc.code == "session_unknown":
                    report.lost += 1
    finally:
        await auditor.close()
        for store in stores:
            await store.close()
    return report


async def denies(store: RedisStore, key: str) -> bool:
    """Whether ``store`` refuses the session now (near-cache or store), not just cannot tell."""
    if store.lookup_cached(key, now=time.time()) is not None:
        return False
    try:
        await store.lookup(key, now=time.time())
    except SessionError:
        return True
    except UnavailableError:
        return False
    return False
