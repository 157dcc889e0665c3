"""The PostgreSQL sink on this machine's server: records land in their own table, ``audit
query`` answers from the indexes, and a database that is down never stops decisions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Iterator

import grpc
import psycopg
import pytest

from authz_server.audit import AuditLog
from authz_server.audit.record import rfc3339
from authz_server.audit.sinks.postgres import PostgresSink, split_url
from authz_server.audit.writer import Backoff
from authz_server.cli import main
from authz_server.config import Config
from authz_server.decision import Pipeline
from authz_server.mesh.processes import free_port
from authz_server.policy.loader import PolicyRuntime
from authz_server.server import build_identity
from tests.support.audit import (TRUST_DOMAIN, check_request_bytes, eventually, facts_for, grpc_check,
                                 postgres_table, unique_table, workload, write_audit_policy)
from tests.support.authz import running_app

BASE = 1_800_000_000.0
ALICE, BOB = workload("alice-svc"), workload("bob-svc")


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_table() as url:
        yield url


async def test_records_land_and_query_answers(tmp_path: Path, pg_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([PostgresSink(pg_url)], batch_size=50)
    pipeline = Pipeline(runtime, identity=build_identity(Config(trust_domains=(TRUST_DOMAIN,))),
                        observers=[audit.observe])
    audit.start()
    made = []
    for i in range(120):
        path = f"/private/{i % 4}" if i % 3 == 0 else f"/public/{i % 4}"
        made.append((BASE + i, ALICE if i % 2 else BOB,
                     await pipeline.decide(facts_for(path, principal=ALICE if i % 2 else BOB), now=BASE + i)))
    await audit.drain()
    await audit.stop()
    runtime.close()

    conninfo, table = split_url(pg_url)
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(f'SELECT decision_id, ts, subject, spiffe_id, allowed, code, policy_version, '
                            f'record->>\'decision_id\' FROM "{table[0]}" ORDER BY ts').fetchall()
        indexes = {r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s",
                                              (table[0],)).fetchall()}
    assert [r[0] for r in rows] == [d.decision_id for _, _, d in made]
    assert all(r[0] == r[7] and r[2] == r[3] for r in rows)
    assert rows[0][1].timestamp() == BASE and rows[0][5] == "policy_denied" and rows[0][4] is False
    assert {r[6] for r in rows} == {made[0][2].policy_version}
    for columns in ("(subject, ts)", "(spiffe_id, ts)", "(ts)", "(allowed, ts)"):
        assert any(index.endswith(f"USING btree {columns}") for index in indexes), columns

    since, until = BASE + 10, BASE + 90
    expected = [d.decision_id for ts, who, d in made if who == ALICE and since <= ts < until]
    window = ["--subject", ALICE, "--since", rfc3339(since), "--until", rfc3339(until)]
    assert main(["audit", "query", "--sink", pg_url, *window, "--json"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["decision_id"] for r in found] == expected

    assert main(["audit", "query", "--sink", pg_url, *window, "--denied", "--json"]) == 0
    denied = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected_denied = [d.decision_id for ts, who, d in made if who == ALICE and since <= ts < until
                       and not d.allowed]
    assert [r["decision_id"] for r in denied] == expected_denied and expected_denied
    assert all(r["allowed"] is False and r["subject"] == ALICE for r in denied)
    window_bob = ["--subject", BOB, "--since", rfc3339(since), "--until", rfc3339(until), "--denied"]
    assert main(["audit", "query", "--sink", pg_url, *window_bob, "--limit", "5"]) == 0
    table_out = capsys.readouterr().out.splitlines()
    assert len(table_out) == 7 and "(limit 5 reached)" in table_out[-1]
    assert all(" deny " in line and "policy_denied" in line for line in table_out[1:-1])


async def test_query_of_a_table_never_written(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "query", "--sink", pg_url, "--since", "-1h", "--json"]) == 0
    assert capsys.readouterr().out == ""


async def test_postgres_down_never_stops_decisions(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test?table={unique_table()}"
    config = Config(policies=str(write_audit_policy(tmp_path / "policies")), addr="127.0.0.1:0", metrics_addr="",
                    trust_domains=(TRUST_DOMAIN,), audit=(url,))
    async with running_app(config) as app:
        audit = app.audit
        assert audit is not None
        writer = audit.writers[0]
        writer.capacity = 50  # a small backlog, so the drops show within the test
        writer.backoff = Backoff(0.01, 0.05)
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = grpc_check(channel)
            responses = await asyncio.gather(*(check(check_request_bytes(f"/public/{i % 3}", principal=ALICE))
                                               for i in range(300)))
        assert all(r.status.code == 0 for r in responses)  # every request answered, and allowed
        await eventually(lambda: writer.stats.errors >= 2 and audit.pending == 0
                         and writer.stats.dropped.get("sink_backlog", 0) + writer.depth == 300,
                         what="sink errors and backlog drops to be counted")
        assert writer.stats.written == 0 and 50 <= writer.depth <= 100  # the backlog, and the batch in hand
        exposition = app.metrics.exposition().decode()
        sink = writer.sink.name
        assert sink.startswith("postgresql://127.0.0.1:") and "postgres@" not in sink
        assert f'authz_audit_sink_errors_total{{sink="{sink}"}} {float(writer.stats.errors)}' in exposition
        assert (f'authz_audit_records_dropped_total{{reason="sink_backlog",sink="{sink}"}} '
                f'{float(300 - writer.depth)}') in exposition
        assert f'authz_audit_queue_depth{{queue="{sink}"}} {float(writer.depth)}' in exposition
        waiting = writer.depth
        await audit.stop(timeout=0.2)  # bounded: the database will not come back
        assert writer.stats.dropped["shutdown"] == waiting
