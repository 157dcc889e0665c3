"""The file sink: size rotation keeps at most ``keep`` files; ``audit query`` reads them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authz_server.audit import AuditLog
from authz_server.audit.record import parse_rfc3339, rfc3339
from authz_server.audit.sinks.file import FileSink, log_files, read_records
from authz_server.cli import main
from authz_server.config import Config
from authz_server.decision import Pipeline
from authz_server.policy.loader import PolicyRuntime
from authz_server.server import build_identity
from tests.support.audit import TRUST_DOMAIN, facts_for, workload, write_audit_policy

BASE = 1_800_000_000.0
ALICE, BOB = workload("alice-svc"), workload("bob-svc")


async def test_rotation_and_query(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "logs" / "authz.jsonl"
    spec = f"file:{log}?max_bytes=16k&keep=3"
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog.from_specs([spec])
    pipeline = Pipeline(runtime, identity=build_identity(Config(trust_domains=(TRUST_DOMAIN,))),
                        observers=[audit.observe])
    audit.start()
    total = 300
    for i in range(total):
        path = f"/private/{i % 5}" if i % 3 == 0 else f"/public/{i % 5}"
        await pipeline.decide(facts_for(path, principal=ALICE if i % 2 else BOB), now=BASE + i)
        if i % 20 == 19:
            await audit.drain()  # small batches, so the file rotates many times
    await audit.stop()
    runtime.close()

    files = log_files(log)
    assert [f.name for f in files] == ["authz.jsonl.2", "authz.jsonl.1", "authz.jsonl"]
    assert sorted(p.name for p in log.parent.iterdir()) == sorted(f.name for f in files)
    assert all(f.stat().st_size <= 16 * 1024 for f in files)
    on_disk = list(read_records(log))
    assert 20 < len(on_disk) < total  # the oldest were rotated away, the newest kept
    assert on_disk[-1]["timestamp"] == rfc3339(BASE + total - 1)

    since, until = BASE + total - 40, BASE + total - 5
    expected = [r["decision_id"] for r in on_disk
                if r["subject"] == ALICE and since <= parse_rfc3339(r["timestamp"]) < until]
    assert main(["audit", "query", "--sink", spec, "--subject", ALICE, "--since", rfc3339(since),
                 "--until", rfc3339(until), "--json"]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["decision_id"] for r in found] == expected and expected
    assert all(r["subject"] == ALICE for r in found)

    assert main(["audit", "query", "--sink", spec, "--subject", ALICE, "--since", rfc3339(since),
                 "--until", rfc3339(until), "--denied", "--json"]) == 0
    denied = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert denied and [r["decision_id"] for r in denied] == [r["decision_id"] for r in found if not r["allowed"]]
    assert all(r["reason"] == "policy_denied" and r["input"]["parsed_path"][0] == "private" for r in denied)

    assert main(["audit", "query", "--sink", spec, "--subject", ALICE, "--since", rfc3339(since),
                 "--until", rfc3339(until), "--denied"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["TIME", "RESULT", "CODE"]
    assert len(table) == len(denied) + 2 and table[-1].startswith(f"{len(denied)} decisions for {ALICE}")
    assert all(" deny " in line and "GET /private/" in line for line in table[1:-1])


async def test_a_rotation_by_another_process_is_followed(tmp_path: Path) -> None:
    """Two writers on one path (two server processes): neither loses lines across rotations."""
    log = tmp_path / "shared.jsonl"
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    first = AuditLog([FileSink(log, max_bytes=8 * 1024, keep=50)])
    second = AuditLog([FileSink(log, max_bytes=8 * 1024, keep=50)])
    pipeline = Pipeline(runtime, observers=[first.observe, second.observe])
    first.start()
    second.start()
    for i in range(120):
        await pipeline.decide(facts_for(f"/public/{i}"), now=BASE + i)
        if i % 10 == 9:
            await first.drain()
            await second.drain()
    await first.stop()
    await second.stop()
    runtime.close()
    ids = [r["decision_id"] for r in read_records(log)]
    assert len(log_files(log)) > 3
    assert len(ids) == 240 and len(set(ids)) == 120  # every decision, once from each writer
