"""Legit and hostile clients of the HTTP front, for the soak test and the hostile benchmark.

Legit clients behave as Envoy's ext_authz HTTP client does: kept-alive connections, whole
requests, a steady rate (open loop: a late answer does not slow the next request), requests
that do not repeat (ids in paths). Each answer is checked against what the policy must say.

Hostile connections each repeat one attack at a steady pace, reconnecting when closed:
``slowloris`` (a head trickled a byte at a time), ``smuggling`` (a request with ambiguous
framing and a second one behind it), ``oversize`` (a head over the cap, or a body declared
over it) and ``deep_json`` (a JSON body nested 900 deep).

Run as ``python -m tests.support.hostile legit|hostile ADDRESS SECONDS [...]`` to load from a
process of its own (prints a JSON result).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import count

import h11

KINDS = ("slowloris", "smuggling", "oversize", "deep_json")


@dataclass
class LegitResult:
    latencies: list[float] = field(default_factory=list)  # seconds, of the requests answered right
    wrong: list[str] = field(default_factory=list)  # what was answered wrongly, or not at all

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


@dataclass
class HostileResult:
    outcomes: Counter[str] = field(default_factory=Counter)  # "kind: what the front did"


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- legit

def _expected(n: int) -> tuple[bytes, int]:
    """Request n and the status the policy gives it: public paths allowed, private ones denied."""
    public = n % 4 != 3
    path = f"/check/{'public' if public else 'private'}/item-{n}?user=u{n % 97}"
    return f"GET {path} HTTP/1.1\r\nhost: orders\r\nx-request-id: r{n}\r\n\r\n".encode(), 200 if public else 403


async def _legit_connection(address: str, numbers: "count[int]", interval: float, until: float,
                            result: LegitResult) -> None:
    reader, writer = await asyncio.open_connection(*split(address))
    parser = h11.Connection(h11.CLIENT)
    next_at = time.monotonic()
    try:
        while time.monotonic() < until:
            next_at += interval
            n = next(numbers)
            request, status = _expected(n)
            started = time.monotonic()
            writer.write(request)
            parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            parser.send(h11.EndOfMessage())
            got = None
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    if not data:
                        raise ConnectionError("closed by the server")
                    parser.receive_data(data)
                elif isinstance(event, h11.Response):
                    got = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
            parser.start_next_cycle()
            if got == status:
                result.latencies.append(time.monotonic() - started)
            else:
                result.wrong.append(f"request {n}: {got} instead of {status}")
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    except (OSError, asyncio.TimeoutError, h11.ProtocolError) as exc:
        result.wrong.append(f"connection failed: {type(exc).__name__}: {exc}")
    finally:
        writer.close()


async def legit_load(address: str, seconds: float, *, rate: float = 200.0, connections: int = 4,
                     first: int = 0) -> LegitResult:
    """``rate`` requests a second for ``seconds``, spread over ``connections`` kept-alive ones."""
    result = LegitResult()
    numbers = count(first)
    until = time.monotonic() + seconds
    await asyncio.gather(*(_legit_connection(address, numbers, connections / rate, until, result)
                           for _ in range(connections)))
    return result


# -- hostile

DEEP = b"[" * 900 + b"]" * 900
ATTACKS = {
    "smuggling": (b"POST /check/public/a HTTP/1.1\r\nhost: v\r\ncontent-length: 0\r\ncontent-length: 44\r\n\r\n"
                  b"GET /check/public/smuggled HTTP/1.1\r\nhost: v\r\n\r\n"),
    "oversize": b"GET /check/public/a HTTP/1.1\r\nhost: v\r\nx-big: " + b"a" * (80 * 1024) + b"\r\n\r\n",
    "oversize_body": b"POST /check/public/a HTTP/1.1\r\nhost: v\r\ncontent-length: 104857600\r\n\r\n",
    "deep_json": (b"POST /check/private/deep HTTP/1.1\r\nhost: v\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(DEEP), DEEP)),
}


async def _answer_of(reader: asyncio.StreamReader) -> str:
    """The status line of the next answer, or how the connection ended."""
    try:
        line = await asyncio.wait_for(reader.readline(), 60)
    except (asyncio.TimeoutError, OSError) as exc:
        return type(exc).__name__
    return line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.1 ") else "closed"


async def _hostile_connection(address: str, kind: str, pace: float, until: float, result: HostileResult,
                              index: int) -> None:
    await asyncio.sleep(pace * (index % 10) / 10)  # spread the connections over the first round
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(*split(address))
        except OSError as exc:
            result.outcomes[f"{kind}: connect {type(exc).__name__}"] += 1
            await asyncio.sleep(pace)
            continue
        try:
            if kind == "slowloris":
                head = b"GET /check/public/slow HTTP/1.1\r\nhost: v\r\nx-slow: " + b"a" * 100_000
                for byte in head:  # one byte per pace/10 until the front gives up on the head
                    if time.monotonic() >= until or reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    with contextlib.suppress(asyncio.TimeoutError):
                        data = await asyncio.wait_for(reader.read(64), pace / 10)
                        if data:
                            result.outcomes[f"{kind}: {data.split(b' ')[1].decode()}"] += 1
                            break
                else:
                    result.outcomes[f"{kind}: never cut off"] += 1
            else:
                attack = ATTACKS["oversize_body" if kind == "oversize" and index // len(KINDS) % 2 else kind]
                writer.write(attack)
                await writer.drain()
                result.outcomes[f"{kind}: {await _answer_of(reader)}"] += 1
                await asyncio.sleep(pace)
        except OSError as exc:
            result.outcomes[f"{kind}: {type(exc).__name__}"] += 1
        finally:
            writer.close()


async def hostile_load(address: str, seconds: float, *, connections: int = 200, pace: float = 1.0) -> HostileResult:
    """``connections`` hostile connections, a quarter of each kind, each attacking once per ``pace``."""
    result = HostileResult()
    until = time.monotonic() + seconds
    await asyncio.gather(*(_hostile_connection(address, KINDS[i % len(KINDS)], pace, until, result, i)
                           for i in range(connections)))
    return result


def main(argv: list[str]) -> int:
    role, address, seconds = argv[0], argv[1], float(argv[2])
    if role == "legit":
        legit = asyncio.run(legit_load(address, seconds, rate=float(argv[3]) if len(argv) > 3 else 200.0,
                                       first=int(argv[4]) if len(argv) > 4 else 0))
        print(json.dumps(asdict(legit)))
    else:
        hostile = asyncio.run(hostile_load(address, seconds, connections=int(argv[3]) if len(argv) > 3 else 200))
        print(json.dumps(dict(hostile.outcomes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
