"""Asking the audit log: "what did subject X do between T1 and T2, and what was denied?"

From PostgreSQL the question is one SQL query over the ``(subject, ts)``,
``(spiffe_id, ts)``, ``(allowed, ts)`` and ``(ts)`` indexes; from a ``file:`` sink the
current and rotated files are scanned. Both answer the same records in time order:
``since`` inclusive, ``until`` exclusive, ``subject`` matching either the record's subject
or its SPIFFE ID, ``denied`` meaning enforced denials (``allowed`` false).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..durations import parse_duration
from ..errors import ConfigError
from .record import parse_rfc3339, rfc3339


@dataclass(frozen=True)
class AuditQuery:
    since: float
    until: float
    subject: str | None = None
    denied: bool = False
    limit: int = 1000


def parse_time(text: str, *, now: float) -> float:
    """``now``, a relative ``-1h``/``-90m``/``now-1h30m``, or RFC 3339 (a date alone is its
    midnight UTC); returns Unix seconds. Raises ``ValueError`` quoting the input."""
    value = text.strip()
    if value == "now":
        return now
    relative = value.removeprefix("now")
    if relative.startswith("-"):
        return now - parse_duration(relative[1:])
    try:
        return parse_rfc3339(value)
    except ValueError:
        raise ValueError(f"expected RFC 3339 (2026-01-02T15:04:05Z), 'now' or a relative time like -1h, "
                         f"got {text!r}") from None


def matches(record: Mapping[str, Any], query: AuditQuery) -> bool:
    if query.subject is not None and query.subject not in (record.get("subject"), record.get("spiffe_id")):
        return False
    if query.denied and record.get("allowed") is not False:
        return False
    try:
        ts = parse_rfc3339(str(record.get("timestamp", "")))
    except ValueError:
        return False
    return query.since <= ts < query.until


def query_file(path: str, query: AuditQuery) -> list[dict[str, Any]]:
    from .sinks.file import read_records

    found: dict[str, dict[str, Any]] = {}
    for record in read_records(path):
        if matches(record, query):
            found.setdefault(str(record.get("decision_id")), record)  # a retried batch may repeat lines
    ordered = sorted(found.values(), key=lambda r: (parse_rfc3339(r["timestamp"]), str(r.get("decision_id"))))
    return ordered[:query.limit]


def query_postgres(url: str, query: AuditQuery) -> list[dict[str, Any]]:
    from datetime import datetime, timezone

    import psycopg
    from psycopg import sql

    from .sinks.postgres import _table_sql, safe_name, split_url

    conninfo, table = split_url(url)
    where = [sql.SQL("ts >= %(since)s AND ts < %(until)s")]
    params: dict[str, Any] = {"since": datetime.fromtimestamp(query.since, timezone.utc),
                              "until": datetime.fromtimestamp(query.until, timezone.utc), "limit": query.limit}
    if query.subject is not None:
        where.append(sql.SQL("(subject = %(subject)s OR spiffe_id = %(subject)s)"))
        params["subject"] = query.subject
    if query.denied:
        where.append(sql.SQL("allowed = false"))
    statement = sql.SQL("SELECT record::text FROM {} WHERE {} ORDER BY ts, decision_id LIMIT %(limit)s").format(
        _table_sql(table), sql.SQL(" AND ").join(where))
    try:
        with psycopg.connect(conninfo, connect_timeout=5) as conn:
            rows = conn.execute(statement, params).fetchall()
    except psycopg.errors.UndefinedTable:
        return []  # nothing was ever written there
    except psycopg.Error as exc:
        raise ConfigError(f"cannot query {safe_name(url)}: {str(exc).strip().splitlines()[0]}") from None
    return [json.loads(row[0]) for row in rows]


def run_query(spec: str, query: AuditQuery) -> list[dict[str, Any]]:
    if spec.startswith("file:"):
        location = spec.removeprefix("file:").partition("?")[0]
        return query_file(location, query)
    if spec.startswith(("postgresql://", "postgres://")):
        return query_postgres(spec, query)
    raise ConfigError(f"cannot query {spec!r}: use a file:PATH or postgresql:// sink", key="--sink")


# -- output

def _request(record: Mapping[str, Any]) -> str:
    http = (((record.get("input") or {}).get("attributes") or {}).get("request") or {}).get("http") or {}
    return f"{http.get('method', '')} {http.get('path', '')}".strip() if isinstance(http, Mapping) else ""


def _result(record: Mapping[str, Any]) -> str:
    if record.get("dry_run"):
        return "dry-run allow" if record.get("would_allow") else "dry-run deny"
    return "allow" if record.get("allowed") else "deny"


def format_table(records: Iterable[Mapping[str, Any]]) -> str:
    header = ("TIME", "RESULT", "CODE", "STATUS", "SUBJECT", "REQUEST", "DECISION ID")
    rows = [header] + [(str(r.get("timestamp", "")), _result(r), str(r.get("reason", "")),
                        str(r.get("http_status", "")), str(r.get("subject") or "-"), _request(r) or "-",
                        str(r.get("decision_id", ""))) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip()
                     for row in rows)


def format_summary(records: list[Mapping[str, Any]], query: AuditQuery) -> str:
    denied = sum(1 for r in records if r.get("allowed") is False)
    who = f" for {query.subject}" if query.subject else ""
    more = f" (limit {query.limit} reached)" if len(records) >= query.limit else ""
    return (f"{len(records)} decisions{who} from {rfc3339(query.since)} to {rfc3339(query.until)}, "
            f"{denied} denied{more}")
