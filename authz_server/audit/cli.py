"""``authz-server audit query``: what a subject did in a time window, and what was denied."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from ..errors import AuthzError
from .query import AuditQuery, format_summary, format_table, parse_time, run_query

_RELATIVE_OR_NUMBER = re.compile(r"^-(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$|^-\d+$|^-\d*\.\d+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    query = sub.add_parser("query", help="list decisions from a file: or postgresql:// audit sink",
                           description="List recorded decisions, oldest first. Times are RFC 3339 "
                                       "(2026-01-02T15:04:05Z), 'now', or relative like -1h, -30m, -1h30m, now-2d.")
    # argparse takes "-1h" for an option; let it pass as a value, like a negative number.
    if hasattr(query, "_negative_number_matcher"):
        query._negative_number_matcher = _RELATIVE_OR_NUMBER
    query.add_argument("--sink", required=True, help="the sink the server writes: file:PATH or postgresql://...")
    query.add_argument("--subject", help="user subject or SPIFFE ID (matches either)")
    query.add_argument("--since", default="-24h", help="start of the window, inclusive (default -24h)")
    query.add_argument("--until", default="now", help="end of the window, exclusive (default now)")
    query.add_argument("--denied", action="store_true", help="only decisions that denied")
    query.add_argument("--limit", type=int, default=1000, help="at most this many records (default 1000)")
    query.add_argument("--json", action="store_true", help="one JSON record per line instead of a table")


def run(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        since = parse_time(args.since, now=now)
        until = parse_time(args.until, now=now)
    except ValueError as exc:
        print(f"authz-server audit: {exc}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("authz-server audit: --limit must be at least 1", file=sys.stderr)
        return 2
    query = AuditQuery(since=since, until=until, subject=args.subject, denied=args.denied, limit=args.limit)
    try:
        records = run_query(args.sink, query)
    except AuthzError as exc:
        print(f"authz-server audit: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        for record in records:
            print(json.dumps(record, separators=(",", ":"), sort_keys=True))
        return 0
    if records:
        print(format_table(records))
    print(format_summary(records, query))
    return 0
