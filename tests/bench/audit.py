"""Audit log numbers: the observer's cost per decision, the record cost, writer throughput.

    python -m tests.bench.audit [--records 20000] [--postgres URL | --postgres '']

Without ``--postgres`` the PostgreSQL sink is measured on the private server of
``tests/support/postgres.py`` (never the machine's own); ``''`` skips it.

The writer's rate is records observed → records on disk / in PostgreSQL, all of it on
one event loop (as in the server): build the input for cache hits, redact, render JSON,
write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from authz_server.audit import AuditLog
from authz_server.audit.sinks.file import FileSink
from authz_server.audit.sinks.postgres import PostgresSink
from authz_server.config import Config
from authz_server.decision import Pipeline
from authz_server.policy.loader import PolicyRuntime
from authz_server.server import build_identity
from tests.support.audit import (facts_for, open_session, secret_headers, secret_path, unique_table,
                                 workload, write_audit_policy)

from .harness import timed


TYPICAL_HEADERS = {"user-agent": "curl/8.5.0", "accept": "application/json", "x-forwarded-proto": "https",
                   "x-request-id": "5f0c2a8e-2f3b-4a8e-9c1d-7b6e5d4c3b2a", "content-type": "application/json"}


async def _decisions(folder: Path, count: int, *, secrets: bool = False) -> tuple[list[Any], list[Any]]:
    """``count`` decisions, half of them cache hits: a typical request (a bearer token and a
    few ordinary headers), or with ``secrets`` one carrying credentials in a dozen places."""
    runtime = PolicyRuntime(str(write_audit_policy(folder)))
    runtime.load()
    identity = build_identity(Config(trust_domains=("example.org",)))
    pipeline = Pipeline(runtime, identity=identity)
    now = time.time()
    session = await open_session(identity.store, subject="alice", spiffe_id=workload("web"), now=now)
    if secrets:
        headers, _ = secret_headers(session)
        path, _ = secret_path("/orders/1")
    else:
        headers = {**TYPICAL_HEADERS, "x-session-id": session}
        path = "/orders/1?page=2"
    facts = [facts_for(path if i % 2 else f"/public/{i % 50}", principal=workload("web"), headers=headers)
             for i in range(count)]
    decisions = [await pipeline.decide(f, now=now) for f in facts]
    runtime.close()
    return decisions, facts


async def observer_cost(decisions: list[Any], facts: list[Any]) -> dict[str, float]:
    audit = AuditLog([], queue_size=len(decisions) + 10)
    d, f = decisions[0], facts[0]
    n = 0

    def enqueue() -> None:
        nonlocal n
        audit.observe(d, f, 0.0)
        n += 1
        if n % 10_000 == 0:
            audit.queue.clear()

    accepted = timed(enqueue, seconds=1.0, min_runs=10_000)
    full = AuditLog([], queue_size=1)
    full.observe(d, f, 0.0)
    dropped = timed(lambda: full.observe(d, f, 0.0), seconds=0.5, min_runs=10_000)
    miss = next(i for i, x in enumerate(decisions) if not x.cached)
    hit = next(i for i, x in enumerate(decisions) if x.cached)
    render_miss = timed(lambda: audit.render([(decisions[miss], facts[miss], 0.0, 0.0)]), seconds=1.0)
    render_hit = timed(lambda: audit.render([(decisions[hit], facts[hit], 0.0, 0.0)]), seconds=1.0)
    return {"observe_us": accepted, "observe_full_queue_us": dropped, "record_us_policy_ran": render_miss,
            "record_us_cache_hit": render_hit}


async def throughput(sink: Any, decisions: list[Any], facts: list[Any]) -> float:
    audit = AuditLog([sink], queue_size=len(decisions) + 10, sink_backlog=len(decisions) + 10)
    audit.start()
    start = time.perf_counter()
    for decision, fact in zip(decisions, facts):
        audit.observe(decision, fact, time.time())
    await audit.drain()
    elapsed = time.perf_counter() - start
    written = audit.writers[0].stats.written
    await audit.stop()
    assert written == len(decisions), (written, len(decisions))
    return len(decisions) / elapsed


async def main(records: int, postgres: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        decisions, facts = await _decisions(Path(tmp) / "secret-policies", 4, secrets=True)
        worst = await observer_cost(decisions, facts)
        decisions, facts = await _decisions(Path(tmp) / "policies", records)
        results: dict[str, Any] = await observer_cost(decisions, facts)
        results["record_us_with_secrets_everywhere"] = worst["record_us_policy_ran"]
        results["file_records_per_s"] = await throughput(FileSink(Path(tmp) / "audit.jsonl"), decisions, facts)
        if postgres:
            table = unique_table()
            url = f"{postgres}{'&' if '?' in postgres else '?'}table={table}"
            try:
                results["postgres_records_per_s"] = await throughput(PostgresSink(url), decisions, facts)
            finally:
                import psycopg

                with psycopg.connect(PostgresSink(url).conninfo, autocommit=True) as conn:
                    conn.execute(f'DROP TABLE IF EXISTS "{table}"')
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.audit")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--postgres", default=None, help="a server's URL, '' to skip PostgreSQL (default: a private "
                                                          "server, tests/support/postgres.py)")
    args = parser.parse_args()
    if args.postgres is None:
        from tests.support.postgres import postgres_url

        args.postgres = postgres_url()
    print(json.dumps(asyncio.run(main(args.records, args.postgres or None)), indent=2))
    sys.exit(0)
