"""Slow and idle clients on the HTTP front (issue 23, item 7): a head must arrive within the
header timeout of its first byte and a body within the body timeout, or the answer is 408 and
the connection closes (slowloris, however slowly it trickles); a kept-alive connection idle for
the idle timeout is closed; past max_connections the oldest idle connection makes room, and
with none idle the newcomer is answered 503. Real server on loopback; time bounds are loose
lower bounds (never early) and generous upper ones (a busy machine is slow, never fast)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import AsyncIterator

from authz_server.config import Config
from authz_server.http import SWEEP_INTERVAL
from authz_server.limits import Limits
from tests.support.authz import running_app, write_policy
from tests.support.rawhttp import exchange

POLICY = "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.parsed_path[0] == \"public\"\n"
GET = b"GET /check/public/a HTTP/1.1\r\nhost: svc\r\n\r\n"
GENEROUS = 30.0  # seconds: an upper bound no busy machine should reach


@contextlib.asynccontextmanager
async def front(tmp_path: Path, limits: Limits) -> AsyncIterator[str]:
    write_policy(tmp_path / "policies", POLICY)
    async with running_app(Config(policies=str(tmp_path / "policies"), addr="", metrics_addr="",
                                  http_addr="127.0.0.1:0", limits=limits)) as app:
        yield app.bound["http_addr"]


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def closed_after(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything read until the server closes, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), GENEROUS)
    return data, time.monotonic() - started


async def test_a_head_or_body_that_takes_too_long_is_answered_408_and_closed(tmp_path: Path) -> None:
    async with front(tmp_path, Limits(header_timeout=1.0, body_timeout=1.0)) as address:
        started = time.monotonic()
        head = await exchange(address, b"GET /check/public/a HTTP/1.1\r\nhost: s", timeout=GENEROUS)
        assert head.statuses == [408] and head.closed
        assert time.monotonic() - started >= 1.0 - SWEEP_INTERVAL
        slow_body = b"POST /check/public/a HTTP/1.1\r\nhost: s\r\ncontent-length: 100\r\n\r\n0123456789"
        body = await exchange(address, slow_body, timeout=GENEROUS)
        assert body.statuses == [408] and body.closed


async def test_a_slowloris_trickle_does_not_reset_the_header_timeout(tmp_path: Path) -> None:
    async with front(tmp_path, Limits(header_timeout=1.0)) as address:
        reader, writer = await connect(address)
        started, sent = time.monotonic(), 0
        request = b"GET /check/public/a HTTP/1.1\r\n" + b"x-slow: " + b"a" * 10_000
        answer = b""
        while not answer and time.monotonic() - started < GENEROUS:
            with contextlib.suppress(ConnectionError):
                writer.write(request[sent:sent + 1])
                await writer.drain()
            sent += 1
            with contextlib.suppress(asyncio.TimeoutError):
                answer = await asyncio.wait_for(reader.read(1024), 0.1)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert sent < 300  # it was cut off, however slowly it kept sending


async def test_idle_connections_are_closed(tmp_path: Path) -> None:
    async with front(tmp_path, Limits(idle_timeout=1.0)) as address:
        never_spoke, _ = await connect(address)
        data, waited = await closed_after(never_spoke)
        assert data == b"" and waited >= 1.0 - SWEEP_INTERVAL
        reader, writer = await connect(address)
        writer.write(GET)
        data, waited = await closed_after(reader)  # answered, then idle: closed
        assert data.startswith(b"HTTP/1.1 200") and waited >= 1.0 - SWEEP_INTERVAL
        writer.close()


async def test_past_the_connection_limit_the_oldest_idle_connection_makes_room(tmp_path: Path) -> None:
    async with front(tmp_path, Limits(max_connections=16, idle_timeout=GENEROUS * 4)) as address:
        idle = [await connect(address) for _ in range(16)]
        await asyncio.sleep(0.2)  # all accepted
        newcomer = await exchange(address, GET, timeout=GENEROUS)
        assert newcomer.statuses == [200]
        data, _ = await closed_after(idle[0][0])  # the oldest went to make room
        assert data == b""
        for _, writer in idle:
            writer.close()

        busy = []  # connections each in the middle of a head: none idle
        for _ in range(16):
            reader, writer = await connect(address)
            writer.write(b"GET /check/public/a HTTP/1.1\r\n")
            busy.append((reader, writer))
        await asyncio.sleep(0.2)
        refused = await exchange(address, GET, timeout=GENEROUS)
        assert refused.statuses == [503] and refused.closed
        for _, writer in busy:
            writer.close()
