"""The HTTP front frames requests with its parser alone (issue 23, item 6): ambiguous framing
is a 400 and the connection closes, so nothing can be smuggled behind a request; the header
cap holds whatever the reads; upgrades, other HTTP versions and trailers change nothing.
A real server on loopback, raw bytes in, answers read with h11."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from authz_server.config import Config
from tests.support.authz import running_app, write_policy
from tests.support.rawhttp import exchange

POLICY = """package envoy.authz
import rego.v1
default allow := false
allow if {
    input.parsed_path[0] == "public"
    not input.attributes.request.http.headers["x-deny"]
}
"""

SMUGGLED = b"GET /check/public/smuggled HTTP/1.1\r\nhost: victim\r\n\r\n"


def post(*header_lines: str, body: bytes = b"") -> bytes:
    head = "\r\n".join(["POST /check/public/a HTTP/1.1", "host: svc", *header_lines])
    return head.encode() + b"\r\n\r\n" + body


# Each carries SMUGGLED where a framer that disagrees with the parser would see a second request.
AMBIGUOUS = {
    "content-length 0 then N": post("content-length: 0", f"content-length: {len(SMUGGLED)}", body=SMUGGLED),
    "content-length N then 0": post(f"content-length: {len(SMUGGLED)}", "content-length: 0", body=SMUGGLED),
    "the same content-length twice": post("content-length: 0", "content-length: 0", body=SMUGGLED),
    "content-length as a list": post(f"content-length: 0, {len(SMUGGLED)}", body=SMUGGLED),
    "space before the colon": post(f"content-length : {len(SMUGGLED)}", body=SMUGGLED),
    "obs-folded content-length": post("x-a: 1", f" content-length: {len(SMUGGLED)}", body=SMUGGLED),
    "obs-folded value": post("content-length:", f" {len(SMUGGLED)}", body=SMUGGLED),
    "content-length and chunked": post("content-length: 5", "transfer-encoding: chunked",
                                       body=b"0\r\n\r\n" + SMUGGLED),
    "chunked then content-length": post("transfer-encoding: chunked", "content-length: 5",
                                        body=b"0\r\n\r\n" + SMUGGLED),
    "transfer-encoding not ending in chunked": post("transfer-encoding: chunked, identity",
                                                    body=b"0\r\n\r\n" + SMUGGLED),
    "transfer-encoding gzip": post("transfer-encoding: gzip", body=SMUGGLED),
    "transfer-encoding gzip, chunked": post("transfer-encoding: gzip, chunked", body=b"0\r\n\r\n" + SMUGGLED),
    "transfer-encoding twice": post("transfer-encoding: chunked", "transfer-encoding: chunked",
                                    body=b"0\r\n\r\n" + SMUGGLED),
    "signed content-length": post(f"content-length: +{len(SMUGGLED)}", body=SMUGGLED),
    "bare LF line ends": post("x-a: 1").replace(b"\r\n", b"\n") + SMUGGLED,
    "bad chunk size": post("transfer-encoding: chunked", body=b"zz\r\n" + SMUGGLED),
    "upgrade": (b"GET /check/public/a HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
                + SMUGGLED),
    "CONNECT": b"CONNECT svc:443 HTTP/1.1\r\nhost: svc\r\n\r\n" + SMUGGLED,
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SMUGGLED,
}


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[str]:
    write_policy(tmp_path / "policies", POLICY)
    async with running_app(Config(policies=str(tmp_path / "policies"), addr="", metrics_addr="",
                                  http_addr="127.0.0.1:0")) as app:
        yield app.bound["http_addr"]


# A transfer coding the front does not undo: 501 (RFC 9112 §6.1).
NOT_IMPLEMENTED = {"transfer-encoding gzip", "transfer-encoding gzip, chunked"}


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
async def test_ambiguous_framing_is_a_400_and_the_connection_closes(front: str, name: str) -> None:
    result = await exchange(front, AMBIGUOUS[name], answers=2, timeout=30)
    assert result.statuses == [501 if name in NOT_IMPLEMENTED else 400] and result.closed, (name, result)


async def test_http_0_9_and_unknown_versions_are_refused(front: str) -> None:
    for request, status in ((b"GET /check/public/a\r\n\r\n" + SMUGGLED, 505),
                            (b"GET /check/public/a HTTP/1.2\r\nhost: svc\r\n\r\n" + SMUGGLED, 400)):
        result = await exchange(front, request, answers=2, timeout=30)
        assert result.statuses == [status] and result.closed, request


async def test_the_header_cap_holds_whatever_the_reads(front: str) -> None:
    big = b"GET /check/public/a HTTP/1.1\r\nhost: svc\r\n" + b"".join(
        f"x-h{i}: {'v' * 1000}\r\n".encode() for i in range(70)) + b"\r\n"
    assert len(big) > 64 * 1024
    in_one_read = await exchange(front, big, answers=2, timeout=30)
    in_small_reads = await exchange(front, b"", chunks=[big[i:i + 1000] for i in range(0, len(big), 1000)],
                                    answers=2, timeout=30)
    one_value = b"GET /check/public/a HTTP/1.1\r\nhost: svc\r\nx-big: "
    streamed = await exchange(front, b"", chunks=[one_value] + [b"v" * 4096] * 20, answers=2, timeout=30)
    long_target = await exchange(front, b"GET /check/public/" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n",
                                 answers=2, timeout=30)
    many = await exchange(front, b"GET /check/public/a HTTP/1.1\r\n" + b"x: 1\r\n" * 201 + b"\r\n",
                          answers=2, timeout=30)
    for result, status in ((in_one_read, 431), (in_small_reads, 431), (streamed, 431), (long_target, 414),
                           (many, 431)):
        assert result.statuses == [status] and result.closed, result


async def test_a_body_over_the_cap_is_refused_before_it_is_sent(front: str) -> None:
    declared = await exchange(front, post(f"content-length: {1024 * 1024 + 1}"), answers=2, timeout=30)
    assert declared.statuses == [413] and declared.closed
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"a" * 64 * 1024)
    chunked = await exchange(front, b"", chunks=[post("transfer-encoding: chunked")] + [chunk] * 17,
                             answers=2, timeout=30)
    assert chunked.statuses == [413] and chunked.closed


async def test_trailers_never_become_headers(front: str) -> None:
    denied = await exchange(front, post("x-deny: 1", "content-length: 0"), timeout=30)
    assert denied.statuses == [403]
    chunked = await exchange(front, post("transfer-encoding: chunked", body=b"2\r\nhi\r\n0\r\nx-deny: 1\r\n\r\n"),
                             timeout=30)
    assert chunked.statuses == [200]


async def test_pipelined_requests_are_answered_in_order_however_they_are_split(front: str) -> None:
    requests = (b"GET /check/public/1 HTTP/1.1\r\nhost: svc\r\n\r\n"
                + post("content-length: 5", body=b"hello")
                + b"GET /check/private HTTP/1.1\r\nhost: svc\r\n\r\n"
                + post("transfer-encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"))
    whole = await exchange(front, requests, answers=4, timeout=30)
    assert whole.statuses == [200, 200, 403, 200]
    for size in (1, 7, 50):
        split = await exchange(front, b"", chunks=[requests[i:i + size] for i in range(0, len(requests), size)],
                               answers=4, timeout=60)
        assert split.statuses == whole.statuses, size


async def test_connection_close_and_http_1_0_end_the_connection(front: str) -> None:
    closing = await exchange(front, b"GET /check/public/a HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n"
                             + SMUGGLED, answers=2, timeout=30)
    assert closing.statuses == [200] and closing.closed
    old = await exchange(front, b"GET /check/public/a HTTP/1.0\r\n\r\n" + SMUGGLED, answers=2, timeout=30)
    assert old.statuses == [200] and old.closed
    kept = await exchange(front, b"GET /check/public/a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n" + SMUGGLED,
                          answers=2, timeout=30)
    assert kept.statuses == [200, 200]


async def test_a_flood_of_pipelined_requests_is_refused(front: str) -> None:
    flood = b"GET /check/public/f HTTP/1.1\r\nhost: s\r\n\r\n" * 300
    result = await exchange(front, flood, answers=301, timeout=60)
    assert result.closed and result.statuses[-1] == 429 and set(result.statuses[:-1]) == {200}
    assert len(result.statuses) <= 130
