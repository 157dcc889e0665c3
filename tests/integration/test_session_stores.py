"""Session stores: the in-process one, and one Redis coming and going (sharing between
replicas, on one Redis, Sentinel and Cluster: test_ha_stores.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from authz_server.errors import SessionError, UnavailableError
from authz_server.identity.redis_store import RedisStore
from authz_server.identity.sessions import Binding, MemoryStore, Session, new_session_id, session_key


def make_session(subject: str = "alice", *, now: float, idle: float = 60, lifetime: float = 3600) -> tuple[str, Session]:
    sid = new_session_id()
    session = Session(key=session_key(sid), subject=subject, issuer="https://idp.test", claims={"sub": subject},
                      created=now, expires=now + lifetime, idle_timeout=idle,
                      binding=Binding(spiffe_id="spiffe://example.org/frontend"), generation=0, jti="j1",
                      last_seen=now)
    return sid, session


def test_session_ids_are_256_bit_and_keys_do_not_reveal_them() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 43 for i in ids)
    sid = next(iter(ids))
    assert sid not in session_key(sid)
    with pytest.raises(SessionError) as bad:
        session_key("short")
    assert bad.value.code == "malformed_session_id"


async def test_memory_store_lifecycle() -> None:
    store = MemoryStore()
    now = 1_000_000.0
    sid, session = make_session(now=now, idle=60, lifetime=600)
    await store.create(session, now=now)
    assert (await store.lookup(session.key, now=now + 30)).subject == "alice"
    assert (await store.lookup(session.key, now=now + 80)).subject == "alice"  # use at +30 kept it alive
    with pytest.raises(SessionError) as idle:
        await store.lookup(session.key, now=now + 200)  # idle for 120 s > 60 s
    assert idle.value.code == "session_expired"

    _, hard = make_session(now=now, idle=500, lifetime=600)
    await store.create(hard, now=now)
    for t in range(0, 600, 100):
        await store.lookup(hard.key, now=now + t)
    with pytest.raises(SessionError) as end:
        await store.lookup(hard.key, now=now + 601)
    assert end.value.code == "session_expired"

    _, one = make_session(now=now)
    await store.create(one, now=now)
    assert await store.revoke(one.key, now=now)
    with pytest.raises(SessionError) as revoked:
        await store.lookup(one.key, now=now + 1)
    assert revoked.value.code == "session_revoked"

    _, a = make_session("bob", now=now)
    _, b = make_session("bob", now=now)
    await store.create(a, now=now)
    await store.create(b, now=now)
    await store.revoke_subject("bob")
    for s in (a, b):
        with pytest.raises(SessionError) as gone:
            await store.lookup(s.key, now=now + 1)
        assert gone.value.code == "session_revoked"
    _, after = make_session("bob", now=now + 2)
    await store.create(after, now=now + 2)  # a new sign-in after the revocation works
    assert (await store.lookup(after.key, now=now + 3)).subject == "bob"

    with pytest.raises(SessionError) as unknown:
        await store.lookup(session_key(new_session_id()), now=now)
    assert unknown.value.code == "session_unknown"


async def test_memory_store_jti_claims() -> None:
    store = MemoryStore()
    now = 1000.0
    assert await store.claim_jti("iss", "t1", "client-a", until=now + 60, now=now) is None
    assert await store.claim_jti("iss", "t1", "client-a", until=now + 60, now=now + 1) == "client-a"
    assert await store.claim_jti("iss", "t1", "client-b", until=now + 60, now=now + 2) == "client-a"
    assert await store.claim_jti("iss", "t1", "client-b", until=now + 60, now=now + 61) is None  # token expired


@pytest.mark.redis
async def test_redis_down_fails_closed_for_new_sessions_keeps_near_cached_and_recovers(redis_server) -> None:
    store = RedisStore(redis_server.url, near_cache_ttl=60)
    await store.start()
    try:
        await asyncio.wait_for(store.subscribed.wait(), 5)
        now = time.time()
        _, known = make_session(now=now)
        await store.create(known, now=now)
        redis_server.stop()

        assert (await store.lookup(known.key, now=now + 1)).subject == "alice"  # near-cached: keeps working
        _, fresh = make_session(now=now)
        with pytest.raises(UnavailableError) as down:
            await store.create(fresh, now=now + 1)
        assert down.value.code == "session_store_unavailable"
        with pytest.raises(UnavailableError):
            await store.lookup(session_key(new_session_id()), now=now + 1)  # not near-cached: cannot tell

        redis_server.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                await store.create(fresh, now=time.time())
                break
            except UnavailableError:
                assert time.monotonic() < deadline, "the store did not recover after Redis came back"
                await asyncio.sleep(0.05)
        await asyncio.wait_for(store.subscribed.wait(), 10)
        assert (await store.lookup(fresh.key, now=time.time())).subject == "alice"
    finally:
        await store.close()


async def _two_replicas(url: str) -> tuple[RedisStore, RedisStore]:
    stores = RedisStore(url, near_cache_ttl=60, timeout=5.0), RedisStore(url, near_cache_ttl=60, timeout=5.0)
    for store in stores:
        await store.start()
        await asyncio.wait_for(store.subscribed.wait(), 10)
    return stores


async def test_a_read_under_way_when_a_revocation_is_announced_is_not_kept(redis_server) -> None:
    """Replica `reader` reads a session from the store; before the read comes back, replica
    `revoker` revokes it and the feed tells `reader`. The read may answer (the session was alive
    when read), but must not be near-cached: the revocation has come and gone already."""
    revoker, reader = await _two_replicas(redis_server.url)
    try:
        now = time.time()
        _, session = make_session(now=now)
        await revoker.create(session, now=now)
        read = reader._lookup_script

        async def read_then_revoked(**kwargs: object) -> object:
            answer = await read(**kwargs)
            heard = reader.invalidations
            await revoker.revoke(session.key, now=time.time())
            while reader.invalidations == heard:  # the feed's message applied at `reader`
                await asyncio.sleep(0.01)
            return answer

        reader._lookup_script = read_then_revoked
        assert (await asyncio.wait_for(reader.lookup(session.key, now=now + 1), 10)).subject == "alice"
        reader._lookup_script = read
        with pytest.raises(SessionError) as refused:
            await reader.lookup(session.key, now=now + 2)
        assert refused.value.code == "session_revoked"
    finally:
        await revoker.close()
        await reader.close()


async def test_a_session_revoked_before_its_idle_clock_is_rewritten_is_not_kept(redis_server) -> None:
    """The lookup reads a session due for a touch; it is revoked before the touch (SET only if
    it exists) and the feed's message has not arrived: the failed touch must not near-cache it."""
    revoker, reader = await _two_replicas(redis_server.url)
    try:
        now = time.time()
        _, session = make_session(now=now - 30, idle=60)  # last seen 30 s ago: the lookup rewrites it
        await revoker.create(session, now=now)
        read, apply = reader._lookup_script, reader._apply

        async def read_then_revoked(**kwargs: object) -> object:
            answer = await read(**kwargs)
            await revoker.revoke(session.key, now=time.time())
            return answer

        reader._lookup_script, reader._apply = read_then_revoked, lambda data: None  # the message is late
        assert (await reader.lookup(session.key, now=now)).subject == "alice"
        reader._lookup_script = read
        with pytest.raises(SessionError) as refused:
            await reader.lookup(session.key, now=now + 1)
        assert refused.value.code == "session_revoked"
    finally:
        reader._apply = apply
        await revoker.close()
        await reader.close()
