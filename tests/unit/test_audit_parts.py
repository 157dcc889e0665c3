"""Audit log pieces that need no server: sink specs, times, query matching, output."""

from __future__ import annotations

import pytest

from authz_server.audit import open_sink
from authz_server.audit.query import AuditQuery, format_table, matches, parse_time
from authz_server.audit.record import parse_rfc3339, query_path, rfc3339, who
from authz_server.audit.sinks.file import FileSink
from authz_server.audit.sinks.postgres import PostgresSink, safe_name, split_url
from authz_server.audit.sinks.stdout import StdoutSink, line_chunks
from authz_server.errors import ConfigError

NOW = 1_800_000_000.0


def test_sink_specs() -> None:
    assert isinstance(open_sink("stdout"), StdoutSink)
    sink = open_sink("file:/var/log/authz.jsonl?max_bytes=10MB&keep=3")
    assert isinstance(sink, FileSink)
    assert (str(sink.path), sink.max_bytes, sink.keep) == ("/var/log/authz.jsonl", 10 * 1024 * 1024, 3)
    pg = open_sink("postgresql://audit:pa55@db.internal:5433/logs?table=ops.decisions&sslmode=require")
    assert isinstance(pg, PostgresSink)
    assert pg.table == ("ops", "decisions")
    assert "table=" not in pg.conninfo and "sslmode=require" in pg.conninfo
    assert pg.name == "postgresql://db.internal:5433/logs?table=ops.decisions"  # no password in logs or labels
    for bad in ("file:/x?max_bytes=lots", "file:/x?keep=0", "file:/x?rotate=1", "file:", "kafka://x", "stdout?x=1",
                "postgresql://h/db?table=drop table"):
        with pytest.raises(ConfigError):
            open_sink(bad)


def test_postgres_url_parts() -> None:
    conninfo, table = split_url("postgres://u@h/db")
    assert table == ("authz_decisions",) and conninfo == "postgres://u@h/db"
    assert safe_name("postgresql://u:secret@h:1/db?password=x") == "postgresql://h:1/db?table=authz_decisions"


def test_times() -> None:
    assert parse_time("now", now=NOW) == NOW
    assert parse_time("-1h", now=NOW) == NOW - 3600
    assert parse_time("-1h30m", now=NOW) == NOW - 5400
    assert parse_time("now-2d", now=NOW) == NOW - 2 * 86400
    assert parse_time("2027-01-15T08:00:00Z", now=NOW) == parse_rfc3339("2027-01-15T08:00:00+00:00")
    assert parse_time("2027-01-15", now=NOW) == parse_rfc3339("2027-01-15T00:00:00Z")
    with pytest.raises(ValueError, match="yesterday"):
        parse_time("yesterday", now=NOW)
    stamp = rfc3339(NOW + 0.123456)
    assert stamp == "2027-01-15T08:00:00.123456Z"
    assert abs(parse_rfc3339(stamp) - (NOW + 0.123456)) < 1e-6


def test_names_from_the_identity_document() -> None:
    assert query_path("data.envoy.authz.allow") == "envoy/authz/allow"
    workload = {"spiffe_id": "spiffe://example.org/web"}
    assert who({"workload": workload, "user": {"sub": "alice"}}) == ("alice", "spiffe://example.org/web")
    assert who({"workload": workload, "user": None}) == ("spiffe://example.org/web", "spiffe://example.org/web")
    assert who({}) == ("", "")


def test_query_matching() -> None:
    record = {"timestamp": rfc3339(NOW), "subject": "alice", "spiffe_id": "spiffe://e.org/web", "allowed": False}
    assert matches(record, AuditQuery(since=NOW, until=NOW + 1, subject="alice"))
    assert matches(record, AuditQuery(since=NOW, until=NOW + 1, subject="spiffe://e.org/web", denied=True))
    assert not matches(record, AuditQuery(since=NOW - 10, until=NOW))  # until is exclusive
    assert not matches(record, AuditQuery(since=NOW, until=NOW + 1, subject="bob"))
    assert not matches({**record, "allowed": True}, AuditQuery(since=NOW, until=NOW + 1, denied=True))
    table = format_table([{**record, "decision_id": "d1", "reason": "policy_denied", "http_status": 403,
                           "input": {"attributes": {"request": {"http": {"method": "GET", "path": "/x"}}}}}])
    header, row = table.splitlines()
    assert header.split() == ["TIME", "RESULT", "CODE", "STATUS", "SUBJECT", "REQUEST", "DECISION", "ID"]
    assert row.split() == [rfc3339(NOW), "deny", "policy_denied", "403", "alice", "GET", "/x", "d1"]


def test_stdout_chunks_never_split_a_line() -> None:
    lines = ["a" * 1000, "b" * 3000, "c" * 5000, "d" * 10]
    chunks = line_chunks([line.encode() for line in lines], limit=4096)
    assert b"".join(chunks) == "".join(line + "\n" for line in lines).encode()
    assert all(chunk.endswith(b"\n") for chunk in chunks)
    assert all(len(chunk) <= 4096 or chunk.count(b"\n") == 1 for chunk in chunks)


def test_public_names() -> None:
    import authz_server.audit as audit

    assert sorted(audit.__all__) == ["AuditLog", "AuditRecord", "Redactor", "Sink", "SinkUnavailable", "open_sink"]


def test_sink_errors_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from authz_server.audit.writer import RateLimitedLog

    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.audit"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.audit"):
        for second in range(25):  # one failure a second for 25 s
            now[0] = 100.0 + second
            limited.warning("sink %s down", "db")
    assert [r.getMessage() for r in caplog.records] == [
        "sink db down", "sink db down (9 similar messages suppressed)", "sink db down (9 similar messages suppressed)"]
