"""``authz-server shadow report``: what the shadow policy would have changed, from the audit log.

Reads the shadow records (``type: shadow``) of a ``file:`` or ``postgresql://`` audit sink in a
time window and summarises them: disagreements by kind, by route (method and path) and
subject, which live and shadow policy versions disagreed, how many requests were compared
(from the counters each record carries: the latest per server instance), and a few examples
to look at with ``authz-server audit query``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..audit.record import parse_rfc3339
from ..errors import AuthzError
from .compare import KINDS


@dataclass
class ShadowReport:
    since: float
    until: float
    records: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_route: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, kind)
    by_subject: Counter[str] = field(default_factory=Counter)
    versions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (live, shadow)
    compared: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "disagreements": self.records, "compared": self.compared,
            "by_kind": {kind: self.by_kind.get(kind, 0) for kind in KINDS},
            "by_route": [{"route": route, "kind": kind, "count": count}
                         for (route, kind), count in self.by_route.most_common(20)],
            "by_subject": [{"subject": subject, "count": count} for subject, count in self.by_subject.most_common(10)],
            "versions": [{"live": live, "shadow": shadow, "count": count}
                         for (live, shadow), count in self.versions.most_common()],
            "examples": self.examples,
        }


def _route(record: Mapping[str, Any]) -> str:
    http = (((record.get("input") or {}).get("attributes") or {}).get("request") or {}).get("http") or {}
    path = str(http.get("path", "")).split("?", 1)[0]
    return f"{http.get('method', '?')} {path or '?'}"


def summarize(records: Iterable[Mapping[str, Any]], *, since: float, until: float, examples: int = 5) -> ShadowReport:
    report = ShadowReport(since=since, until=until)
    latest: dict[str, tuple[float, int]] = {}  # server instance -> (time, compared so far)
    for record in records:
        shadow = record.get("shadow")
        if record.get("type") != "shadow" or not isinstance(shadow, Mapping):
            continue
        try:
            when = parse_rfc3339(str(record.get("timestamp", "")))
        except ValueError:
            continue
        if not since <= when < until:
            continue
        kind = str(shadow.get("kind"))
        report.records += 1
        report.by_kind[kind] += 1
        report.by_route[(_route(record), kind)] += 1
        report.by_subject[str(record.get("subject") or "(none)")] += 1
        bundles = record.get("bundles") or {}
        report.versions[(str((bundles.get("live") or {}).get("revision", "")),
                         str((bundles.get("shadow") or {}).get("revision", "")))] += 1
        instance = str((record.get("labels") or {}).get("id", ""))
        compared = int((shadow.get("stats") or {}).get("compared", 0) or 0)
        if instance not in latest or latest[instance][0] <= when:
            latest[instance] = (when, compared)
        if len(report.examples) < examples:
            report.examples.append({"decision_id": record.get("shadow_of"), "timestamp": record.get("timestamp"),
                                    "kind": kind, "route": _route(record), "subject": record.get("subject"),
                                    "live": shadow.get("live"), "shadow": shadow.get("shadow")})
    report.compared = sum(compared for _, compared in latest.values())
    return report


def load_records(sink: str, *, since: float, until: float) -> list[dict[str, Any]]:
    """The shadow records of a ``file:PATH`` or ``postgresql://`` sink in ``[since, until)``."""
    if sink.startswith("file:"):
        from ..audit.sinks.file import read_records

        return [r for r in read_records(sink[5:].split("?", 1)[0]) if r.get("type") == "shadow"]
    if sink.startswith(("postgresql://", "postgres://")):
        return _postgres_records(sink, since, until)
    raise AuthzError(f"cannot read shadow records from {sink!r}: use file:PATH or postgresql://...",
                     code="audit_sink_unreadable")


def _postgres_records(url: str, since: float, until: float) -> list[dict[str, Any]]:
    import json
    from datetime import datetime, timezone

    import psycopg
    from psycopg import sql

    from ..audit.sinks.postgres import _table_sql, safe_name, split_url

    conninfo, table = split_url(url)
    statement = sql.SQL("SELECT record::text FROM {} WHERE code LIKE 'shadow\\_%%' AND ts >= %(since)s AND "
                        "ts < %(until)s ORDER BY ts").format(_table_sql(table))
    params = {"since": datetime.fromtimestamp(since, timezone.utc), "until": datetime.fromtimestamp(until, timezone.utc)}
    try:
        with psycopg.connect(conninfo, connect_timeout=5) as conn:
            rows = conn.execute(statement, params).fetchall()
    except psycopg.errors.UndefinedTable:
        return []
    except psycopg.Error as exc:
        raise AuthzError(f"{safe_name(url)}: {str(exc).strip().splitlines()[0]}", code="audit_sink_unreadable") from None
    return [json.loads(row[0]) for row in rows]


def format_report(report: ShadowReport) -> str:
    from ..audit.record import rfc3339

    lines = [f"shadow disagreements from {rfc3339(report.since)} to {rfc3339(report.until)}: {report.records}"
             + (f" of {report.compared} requests compared ({report.records / report.compared:.2%})"
                if report.compared else "")]
    for kind in KINDS:
        lines.append(f"  {kind:<16} {report.by_kind.get(kind, 0)}")
    if report.by_route:
        lines.append("by route:")
        for (route, kind), count in report.by_route.most_common(10):
            lines.append(f"  {count:>7}  {kind:<16} {route}")
    if report.by_subject:
        lines.append("by subject:")
        for subject, count in report.by_subject.most_common(5):
            lines.append(f"  {count:>7}  {subject}")
    for (live, shadow), count in report.versions.most_common():
        lines.append(f"live policy {live or '?'} vs shadow {shadow or '?'}: {count}")
    if report.examples:
        lines.append("examples (authz-server audit query --json ... | grep DECISION_ID):")
        for example in report.examples:
            lines.append(f"  {example['timestamp']}  {example['decision_id']}  {example['kind']}  {example['route']}")
    return "\n".join(lines)
