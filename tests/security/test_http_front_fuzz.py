"""The HTTP front's framing against a reference parser's (issue 23): hypothesis writes streams of
requests (pipelined, chunked or with a length, kept alive or not), mutates their framing the
ways smuggling attacks do, splits them into reads at random, and sends them to a real server;
h11, a second HTTP/1.1 implementation, reads the same bytes.

The front may be stricter than h11, never looser: every request it answers is the request h11
framed at that place in the stream (same method, target and body, echoed back by the policy),
it answers no more requests than h11 framed, and after refusing one it answers nothing more
and closes. Streams nobody mutated are answered whole."""

from __future__ import annotations

import base64
import json
import socket
import time
from dataclasses import dataclass
from typing import Iterator

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_server.config import Config
from authz_server.server import build_app
from tests.support.authz import ServerThread, write_policy

# The policy echoes what the front read, so the test can hold it to what h11 read.
ECHO = """package envoy.authz
import rego.v1
http := input.attributes.request.http
default body := ""
body := base64.encode(http.body) if http.body
body := http.rawBody if http.rawBody  # not UTF-8: the front gives it base64-encoded
allow := {"allowed": true, "headers": {"x-seen-method": http.method, "x-seen-path": http.path, "x-seen-body": body}}
"""
REFUSALS = {400, 408, 413, 414, 429, 431, 501, 505}
FUZZ = settings(deadline=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Seen:
    method: bytes
    target: bytes  # as h11 read it; as the policy saw it (after the /check prefix) when echoed
    body: bytes


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    folder = tmp_path_factory.mktemp("echo")
    write_policy(folder, ECHO)
    runner = ServerThread()
    app = build_app(Config(policies=str(folder), addr="", metrics_addr="", http_addr="127.0.0.1:0"))
    try:
        bound = runner.run(app.start())
        host, _, port = bound["http_addr"].rpartition(":")
        yield host, int(port)
    finally:
        runner.run(app.stop(0))
        runner.close()


# -- what h11 frames

def reference(stream: bytes) -> tuple[list[Seen], bool]:
    """The requests h11 reads from ``stream`` in order, and whether it read it all cleanly.

    One allowance: empty lines (any CR and LF) before a request line are skipped, as RFC 9112
    §2.2 asks of a server ("SHOULD ignore at least one empty line") and llhttp does; h11
    refuses them. Where the next request begins is the same either way."""
    seen: list[Seen] = []
    rest = stream.lstrip(b"\r\n")
    while rest:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        connection.receive_data(rest)
        ended = False
        request, body = None, b""
        try:
            while True:
                event = connection.next_event()
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    seen.append(Seen(request.method, request.target, body))
                    connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                    connection.send(h11.EndOfMessage())
                    if connection.our_state is h11.MUST_CLOSE:
                        return seen, True
                    connection.start_next_cycle()
                    following = connection.trailing_data[0]
                    if following[:1] in (b"\r", b"\n"):
                        rest = following.lstrip(b"\r\n")
                        break  # a fresh h11 for what follows the empty lines
                elif event is h11.NEED_DATA and not ended:
                    connection.receive_data(b"")  # the client is done
                    ended = True
                elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    return seen, connection.their_state in (h11.IDLE, h11.CLOSED, h11.DONE)
                elif event is h11.PAUSED:
                    return seen, True
        except (h11.RemoteProtocolError, h11.LocalProtocolError):
            return seen, False
    return seen, True


# -- what the front answers

@dataclass
class Reply:
    status: int
    seen: Seen | None  # what an allow echoes
    closing: bool
    decided: bool  # by the pipeline (a decision id), not refused by the connection


def front_answers(address: tuple[str, int], chunks: list[bytes]) -> list[Reply]:
    with socket.create_connection(address, timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(0.0005)  # most pieces arrive as reads of their own
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused and closed while we were still sending
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            pass
    client = h11.Connection(h11.CLIENT)
    client.receive_data(received)
    client.receive_data(b"")
    replies: list[Reply] = []
    while True:
        if client.our_state is h11.IDLE:
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:  # closed where a client of a kept-alive connection expects more
            break
        if isinstance(event, h11.Response):
            headers = {k.decode(): v for k, v in event.headers}
            seen = None
            if event.status_code == 200:
                seen = Seen(headers["x-seen-method"], headers["x-seen-path"], base64.b64decode(headers["x-seen-body"]))
            replies.append(Reply(event.status_code, seen, headers.get("connection") == b"close",
                                 "x-authz-decision-id" in headers))
        elif isinstance(event, h11.EndOfMessage):
            if client.their_state is h11.MUST_CLOSE:
                break
            client.start_next_cycle()
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
    return replies


def as_engine_holds_it(body: bytes) -> bytes:
    """regopy keeps a string JSON-escaped (docs/architecture.md), and so echoes it."""
    try:
        return json.dumps(body.decode(), ensure_ascii=False)[1:-1].encode()
    except UnicodeDecodeError:  # given as rawBody, never escaped
        return body


def assert_no_looser_than_h11(stream: bytes, chunks: list[bytes], front: tuple[str, int], *,
                              clean: bool) -> None:
    expected, whole = reference(stream)
    replies = front_answers(front, chunks)
    answered = [r for r in replies if r.decided]
    refused = [i for i, r in enumerate(replies) if not r.decided]
    assert all(r.status in REFUSALS for r in replies if not r.decided), replies
    if refused:  # a refusal is the last answer on its connection
        assert refused[0] == len(replies) - 1 and replies[-1].closing, replies
    assert len(answered) <= len(expected), (answered, expected)  # never a request h11 did not frame
    for got, want in zip(answered, expected):
        if got.seen is None:  # decided, but denied: a target or body the pipeline refuses (bad_path, a NUL)
            assert got.status == 400, (got, want)
            continue
        path = (want.target[len(b"/check"):] or b"/") if want.target.startswith(b"/check") else want.target
        assert (got.seen.method, got.seen.target) == (want.method, path), (got.seen, want)
        assert got.seen.body in (want.body, as_engine_holds_it(want.body)), (got.seen, want)
    if clean:
        assert whole and len(answered) == len(expected) and not refused, (replies, expected)


# -- streams

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", max_size=10)
VALUE = st.text(alphabet="".join(chr(c) for c in range(0x21, 0x7f)) + " ", max_size=24).map(str.strip)
BODY = st.binary(max_size=80).map(lambda b: bytes(c & 0x7f for c in b))  # ASCII: the echo reads it as text
EMBEDDED = st.sampled_from([b"", b"GET /check/smuggled HTTP/1.1\r\nhost: v\r\n\r\n",
                            b"0\r\n\r\n", b"\r\n\r\n", b"5\r\nhello\r\n"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    target = "/check/" + "/".join(draw(st.lists(SEGMENT, max_size=3)))
    version = draw(st.sampled_from(["HTTP/1.1"] * 5 + ["HTTP/1.0"]))
    headers = [("host", "svc")] + draw(st.lists(st.tuples(TOKEN.map("x-".__add__), VALUE), max_size=4))
    body = draw(BODY) + draw(EMBEDDED)
    framing = draw(st.sampled_from(["length", "chunked", "none"] if version == "HTTP/1.1" else ["length", "none"]))
    if framing == "none":
        body = b""
    # HTTP/1.0 is never kept alive here: h11 does not keep 1.0 connections alive at all.
    if version == "HTTP/1.1" and draw(st.integers(0, 9)) == 0:
        headers.append(("connection", "close"))
    if framing == "length":
        headers.append(("content-length", str(len(body))))
        payload = body
    elif framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        ext = draw(st.sampled_from(["", ";x=1"]))
        payload = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext.encode(), p) for p in pieces) + b"0\r\n"
        payload += draw(st.sampled_from([b"", b"x-trailer: 1\r\n"])) + b"\r\n"
    else:
        payload = b""
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + payload


def mutations(stream: bytes) -> st.SearchStrategy[bytes]:
    """What smuggling attempts do to framing, and plain damage."""
    def replace(old: bytes, new: bytes) -> st.SearchStrategy[bytes]:
        return st.just(stream.replace(old, new, 1)) if old in stream else st.just(stream)

    return st.one_of(
        replace(b"content-length: ", b"content-length: 0\r\ncontent-length: "),
        replace(b"content-length: ", b"content-length : "),
        replace(b"content-length: ", b"content-length:\r\n "),
        replace(b"content-length: ", b"x-a: 1\r\n content-length: "),
        replace(b"content-length: ", b"transfer-encoding: chunked\r\ncontent-length: "),
        replace(b"transfer-encoding: chunked", b"transfer-encoding: chunked\r\ncontent-length: 3"),
        replace(b"transfer-encoding: chunked", b"transfer-encoding: chunked, identity"),
        replace(b"transfer-encoding: chunked", b"transfer-encoding: gzip, chunked"),
        replace(b"transfer-encoding: chunked", b"transfer-encoding:\tchunked"),
        replace(b"transfer-encoding: chunked", b"transfer-encoding: xchunked"),
        replace(b"content-length: ", b"content-length: +"),
        replace(b"content-length: ", b"content-length: 00"),
        replace(b"\r\n", b"\n"),
        replace(b"\r\n\r\n", b"\r\n \r\n"),
        replace(b"host: svc\r\n", b"host: svc\r\nhost: other\r\n"),
        replace(b"host: svc\r\n", b""),
        replace(b" HTTP/1.1\r\n", b" HTTP/1.1\r\nupgrade: x\r\nconnection: upgrade\r\n"),
        st.tuples(st.integers(0, max(0, len(stream) - 1)), st.binary(min_size=1, max_size=3)).map(
            lambda t: stream[:t[0]] + t[1] + stream[t[0]:]),
        st.integers(0, max(0, len(stream) - 1)).map(lambda i: stream[:i] + stream[i + 1:]),
        st.integers(0, len(stream)).map(lambda i: stream[:i]),
    )


def splits(stream: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6).map(
        lambda cuts: [stream[a:b] for a, b in zip([0, *sorted(set(cuts))], [*sorted(set(cuts)), len(stream)])
                      if b > a])


@st.composite
def clean_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = b"".join(draw(st.lists(requests(), min_size=1, max_size=4)))
    return stream, draw(splits(stream))


@st.composite
def hostile_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = b"".join(draw(st.lists(requests(), min_size=1, max_size=3)))
    for _ in range(draw(st.integers(1, 2))):
        stream = draw(mutations(stream))
    return stream, draw(splits(stream))


@FUZZ
@given(case=clean_streams())
def test_well_framed_streams_are_answered_whole_as_h11_reads_them(front: tuple[str, int],
                                                                   case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    expected, whole = reference(stream)
    assert whole, "the generator wrote a stream h11 refuses"
    assert_no_looser_than_h11(stream, chunks, front, clean=True)


@FUZZ
@given(case=hostile_streams())
def test_the_front_never_answers_a_request_h11_did_not_frame(front: tuple[str, int],
                                                              case: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = case
    assert_no_looser_than_h11(stream, chunks, front, clean=False)
