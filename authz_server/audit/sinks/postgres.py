"""``postgresql://user@host:port/db?table=NAME``: records in PostgreSQL, for querying.

The connection string is libpq's (any of its parameters may be given); ``table`` is ours
(default ``authz_decisions``, optionally schema-qualified) and is removed before
connecting. On first use the table and its indexes are created (under an advisory lock, so
several server processes may start at once)::

    decision_id text PRIMARY KEY, ts timestamptz, subject text, spiffe_id text,
    allowed boolean, code text, policy_version text, record jsonb
    indexes: (subject, ts), (spiffe_id, ts), (ts), (allowed, ts)

A batch is one ``INSERT ... SELECT FROM unnest(...)`` statement with its columns as binary
arrays (one round trip; text arrays of JSON cost PostgreSQL five times more to parse), idempotent
by ``decision_id`` so a retried batch never doubles a record. A lost or refused connection
raises ``SinkUnavailable`` (the writer retries with backoff and reconnects); an error in the
data itself drops that batch.

Everything of a batch happens in a worker thread, on a plain (blocking) connection: the
columns, their binary encoding, the round trip. Only the hand-off touches the event loop, so
a batch of 500 records costs the decisions' loop nothing (with an asyncio connection the
encoding alone held it for about a millisecond per batch). Batching, the bounded backlog and
the drop counters are the writer's (``writer.py``).
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.parse
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from ...errors import AuthzError, ConfigError
from ..record import AuditRecord
from .base import SinkUnavailable, in_worker_thread

if TYPE_CHECKING:
    import psycopg

DEFAULT_TABLE = "authz_decisions"
CONNECT_TIMEOUT = 3  # seconds; a black-holed host must not hold the writer for long
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# jsonb refuses NUL (\u0000); an escaped backslash before it is not an escape.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def split_url(url: str) -> tuple[str, tuple[str, ...]]:
    """(libpq URL without our ``table`` option, table name as its dotted parts)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    table = DEFAULT_TABLE
    kept = []
    for name, value in query:
        if name == "table":
            table = value
        else:
            kept.append((name, value))
    names = tuple(table.split("."))
    if not 1 <= len(names) <= 2 or not all(_IDENTIFIER.fullmatch(n) for n in names):
        raise ConfigError(f"table must be NAME or SCHEMA.NAME (letters, digits, _), got {table!r}", key="audit")
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept))), names


def safe_name(url: str) -> str:
    """The URL without user, password or libpq options, with the table: fit for logs and
    metric labels, and distinct for two tables in one database."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    table = dict(urllib.parse.parse_qsl(parts.query)).get("table", DEFAULT_TABLE)
    return f"{parts.scheme}://{host}{port}{parts.path}?table={table}"


def _table_sql(names: tuple[str, ...]) -> Any:
    from psycopg import sql

    return sql.Identifier(*names)


def schema_statements(names: tuple[str, ...]) -> list[Any]:
    from psycopg import sql

    table = _table_sql(names)
    base = names[-1]
    statements = [sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (decision_id text PRIMARY KEY, ts timestamptz NOT NULL, subject text, "
        "spiffe_id text, allowed boolean NOT NULL, code text, policy_version text, record jsonb NOT NULL)"
    ).format(table)]
    for suffix, columns in (("subject_ts", "subject, ts"), ("spiffe_id_ts", "spiffe_id, ts"), ("ts", "ts"),
                            ("allowed_ts", "allowed, ts")):
        statements.append(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (" + columns + ")").format(
            sql.Identifier(f"{base}_{suffix}"[:63]), table))
    return statements


def _text(value: str) -> str | None:
    return value.replace("\x00", "\ufffd") if value else None


class PostgresSink:
    def __init__(self, url: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.conninfo, self.table = split_url(url)
        self.name = safe_name(url)
        self.connect_timeout = connect_timeout
        self._conn: "psycopg.Connection[Any] | None" = None
        self._insert: Any = None
        self._lock = threading.Lock()  # one batch at a time on the connection (the writer sends one anyway)
        self.cpu_seconds = 0.0

    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        if records:
            await in_worker_thread(self, self._write, records)

    async def close(self) -> None:
        await asyncio.to_thread(self._drop_connection)

    # -- in a worker thread
    def _write(self, records: Sequence[AuditRecord]) -> None:
        import psycopg

        columns: list[list[Any]] = [[] for _ in range(8)]
        for record in records:
            for column, value in zip(columns, (
                    record.decision_id, datetime.fromtimestamp(record.timestamp, timezone.utc),
                    _text(record.subject), _text(record.spiffe_id), record.allowed, _text(record.code),
                    _text(record.policy_version), _JSON_NUL.sub(r"\1\\ufffd", record.line))):
                column.append(value)
        with self._lock:
            try:
                conn = self._connection()
                conn.execute(self._insert, columns)
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                self._drop_connection_locked()
                raise SinkUnavailable(f"{self.name}: {_first_line(exc)}") from None
            except psycopg.Error as exc:
                raise AuthzError(f"{self.name}: batch refused: {_first_line(exc)}",
                                 code="audit_batch_refused") from None

    def _connection(self) -> "psycopg.Connection[Any]":
        import psycopg
        from psycopg import sql

        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = psycopg.Connection.connect(self.conninfo, autocommit=True,
                                          connect_timeout=max(1, int(self.connect_timeout)))
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (".".join(self.table),))
                for statement in schema_statements(self.table):
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._insert = sql.SQL(
            "INSERT INTO {} (decision_id, ts, subject, spiffe_id, allowed, code, policy_version, record) "
            "SELECT d, t, s, w, a, c, v, r::jsonb FROM unnest(%b::text[], %b::timestamptz[], %b::text[], "
            "%b::text[], %b::boolean[], %b::text[], %b::text[], %b::text[]) AS u(d, t, s, w, a, c, v, r) "
            "ON CONFLICT (decision_id) DO NOTHING").format(_table_sql(self.table))
        self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        with self._lock:
            self._drop_connection_locked()

    def _drop_connection_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing more to release
                pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
