"""Send requests byte-for-byte (HTTP clients normalise paths like //a or /../ themselves, and
never send the malformed framing the HTTP front must refuse) and read the answers with h11."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h11


async def raw_request(port: int, target: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                      host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [f"{method} {target} HTTP/1.1", "host: test", "connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Exchange:
    """What came back on one connection: the answers, and whether the server closed it."""

    answers: list[Answer] = field(default_factory=list)
    closed: bool = False
    timed_out: bool = False  # neither the answers asked for nor a close came in time

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]


async def exchange(address: str, data: bytes, *, answers: int = 1, timeout: float = 30.0,
                   chunks: list[bytes] | None = None, pause: float = 0.0) -> Exchange:
    """Send ``data`` (or ``chunks``, ``pause`` seconds apart) on one connection to ``host:port``
    and read until ``answers`` responses came, the server closed the connection or ``timeout``
    passed."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    parser = h11.Connection(h11.CLIENT)
    result = Exchange()
    deadline = None
    try:
        for piece in chunks if chunks is not None else [data]:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        complete = 0
        async with asyncio.timeout(timeout) as deadline:
            while complete < answers:
                if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
                    parser.start_next_cycle()
                if parser.our_state is h11.IDLE:  # h11 reads a response only after a request
                    parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
                    parser.send(h11.EndOfMessage())
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    chunk = await reader.read(65536)
                    if not chunk:
                        result.closed = True
                        break
                    parser.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    result.answers.append(Answer(event.status_code, {k.decode().lower(): v.decode("latin-1")
                                                                     for k, v in event.headers}))
                elif isinstance(event, h11.Data):
                    result.answers[-1].body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    complete += 1
                    if parser.their_state is h11.MUST_CLOSE:
                        result.closed = await reader.read(1) == b""
                        break
    except TimeoutError:
        if deadline is None or not deadline.expired():
            raise
        result.timed_out = True
    except (ConnectionResetError, BrokenPipeError):
        result.closed = True
    finally:
        writer.close()
    return result
