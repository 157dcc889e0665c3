"""The audit log behind a real server: one record per decision, under load, in OPA's shape;
a full queue drops and counts without holding a decision back; shutdown flushes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz_server.audit import AuditLog
from authz_server.audit.record import parse_rfc3339
from authz_server.audit.sinks.file import FileSink
from authz_server.config import Config
from authz_server.decision import Pipeline
from authz_server.errors import RequestError
from authz_server.policy.loader import PolicyRuntime
from authz_server.server import build_identity
from tests.support.audit import (TRUST_DOMAIN, check_request_bytes, facts_for, grpc_check, jsonl, workload,
                                 write_audit_policy)
from tests.support.authz import running_app

OPA_FIELDS = {"decision_id", "timestamp", "path", "input", "bundles", "labels", "metrics", "requested_by"}
OUR_FIELDS = {"allowed", "reason", "message", "http_status", "phase", "cached", "dry_run", "subject", "spiffe_id",
              "transport"}


def _request(i: int) -> bytes:
    # 10 workloads; a third of the calls repeat an earlier request exactly (decision-cache hits).
    path = f"/public/{i % 600}" if i % 2 else f"/private/{i % 600}"
    return check_request_bytes(path, principal=workload(f"svc-{i % 10}"), headers={"x-n": str(i % 600)},
                               request_id=f"req-{i}")


def _decision_id(response) -> str:  # type: ignore[no-untyped-def]
    part = response.ok_response if response.status.code == 0 else response.denied_response
    return next(h.header.value for h in part.headers if h.header.key == "x-authz-decision-id")


async def test_one_record_per_decision_under_load(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "audit.jsonl"
    config = Config(policies=str(write_audit_policy(tmp_path / "policies")), addr="127.0.0.1:0", metrics_addr="",
                    trust_domains=(TRUST_DOMAIN,), audit=("stdout", f"file:{log_file}"))
    count = 2000
    async with running_app(config) as app:
        assert app.audit is not None
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = grpc_check(channel)
            # grpcio itself (a bare aio server too) cancels every call once ~1,000 are in flight
            # on one server, so 500 at a time: still far more than the writer's batch size.
            in_flight = asyncio.Semaphore(500)

            async def call(i: int):  # type: ignore[no-untyped-def]
                async with in_flight:
                    return await check(_request(i))

            started = time.perf_counter()
            responses = await asyncio.gather(*(call(i) for i in range(count)))
            elapsed = time.perf_counter() - started
        decided = {_decision_id(r): r.status.code == 0 for r in responses}
        assert len(decided) == count
        await app.audit.drain()
        exposition = app.metrics.exposition().decode()
    records = list(jsonl(log_file))
    assert len(records) == count
    assert {r["decision_id"]: r["allowed"] for r in records} == decided
    stdout_records = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert sorted(r["decision_id"] for r in stdout_records) == sorted(decided)
    assert any(r["cached"] for r in records) and any(not r["cached"] for r in records)
    for record in records:
        assert OPA_FIELDS | OUR_FIELDS <= set(record)
        assert ("result" in record) == (record["reason"] in ("allowed", "policy_denied"))  # not when it timed out
        assert record["path"] == "envoy/authz/allow"
        assert record["input"]["attributes"]["request"]["http"]["id"] == record["request_id"]
        parse_rfc3339(record["timestamp"])
    assert f'authz_audit_records_written_total{{sink="file:{log_file}"}} {float(count)}' in exposition
    assert 'authz_audit_records_dropped_total{reason="queue_full",sink="all"} 0.0' in exposition
    sink_cpu = {sample.labels["sink"]: sample.value for family in text_string_to_metric_families(exposition)
                if family.name == "authz_audit_sink_cpu_seconds" for sample in family.samples}
    assert sink_cpu.keys() == {"stdout", f"file:{log_file}"}
    assert all(seconds > 0 for seconds in sink_cpu.values()), sink_cpu  # each sink's threads wrote 2,000 records
    print(f"\n{count} gRPC decisions in {elapsed:.2f}s with the audit log on", file=sys.stderr)


async def test_record_shape(tmp_path: Path) -> None:
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")], labels={"app": "authz-server", "id": "i-1",
                                                                  "version": "test"})
    pipeline = Pipeline(runtime, identity=build_identity(Config(trust_domains=(TRUST_DOMAIN,))),
                        observers=[audit.observe])
    audit.start()
    now = 1_800_000_000.25
    busy = await pipeline.decide(facts_for("/busy", principal=workload("web")), now=now)
    refused = pipeline.refuse(RequestError("bad", code="malformed_request"), now=now)
    await audit.drain()
    await audit.stop()
    runtime.close()
    by_id = {r["decision_id"]: r for r in jsonl(tmp_path / "audit.jsonl")}
    record = by_id[busy.decision_id]
    assert record["timestamp"] == "2027-01-15T08:00:00.250000Z"
    assert record["labels"] == {"app": "authz-server", "id": "i-1", "version": "test"}
    assert record["bundles"] == {"authz": {"revision": busy.policy_version}}
    assert record["result"] == {"allowed": False, "http_status": 429, "body": "slow down",
                                "headers": {"x-reason": "busy"}}
    assert (record["allowed"], record["reason"], record["http_status"]) == (False, "policy_denied", 429)
    assert record["subject"] == record["spiffe_id"] == "spiffe://example.org/web"
    assert record["requested_by"] == "10.0.0.7:41000"
    assert record["input"]["parsed_path"] == ["busy"]
    assert record["input"]["identity"]["workload"]["spiffe_id"] == "spiffe://example.org/web"
    assert isinstance(record["metrics"]["timer_server_handler_ns"], int)
    refused_record = by_id[refused.decision_id]
    assert "input" not in refused_record and refused_record["phase"] == "request"
    assert refused_record["reason"] == "malformed_request"


async def test_full_queue_drops_and_counts_without_holding_decisions(tmp_path: Path) -> None:
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")], queue_size=16)
    pipeline = Pipeline(runtime)
    now = time.time()
    for i in range(7):  # warm the decision cache: the burst below is all cache hits, the fast path
        await pipeline.decide(facts_for(f"/public/{i}"), now=now)
    pipeline.observers.append(audit.observe)
    # The writer is not running yet: the queue fills after 16 and every other record is dropped.
    decisions = await asyncio.gather(*(pipeline.decide(facts_for(f"/public/{i % 7}"), now=now)
                                       for i in range(2000)))
    assert all(d.allowed for d in decisions)
    assert audit.stats.dropped == {"queue_full": 2000 - 16}
    # On a full queue the observer is a failed put and a counter: far below a decision's cost.
    started = time.perf_counter()
    for _ in range(10_000):
        audit.observe(decisions[0], None, now)
    per_call_us = (time.perf_counter() - started) / 10_000 * 1e6
    assert per_call_us < 25, per_call_us
    audit.start()
    await audit.drain()
    assert audit.writers[0].stats.written == 16
    families = {f.name: f for f in audit.collect()}
    assert [s.value for s in families["authz_audit_records_dropped"].samples
            if s.labels == {"sink": "all", "reason": "queue_full"}] == [2000 - 16 + 10_000]
    await audit.stop()
    runtime.close()


async def test_stop_flushes_what_is_queued(tmp_path: Path) -> None:
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")])
    pipeline = Pipeline(runtime, observers=[audit.observe])
    audit.start()
    now = time.time()
    for i in range(300):
        await pipeline.decide(facts_for(f"/public/{i}"), now=now)
    await audit.stop(timeout=5)  # no drain first: stop itself writes the queue out
    assert len(list(jsonl(tmp_path / "audit.jsonl"))) == 300
    pipeline_after = await pipeline.decide(facts_for("/public/late"), now=now)
    assert pipeline_after.allowed and audit.stats.dropped == {"shutdown": 1}
    runtime.close()


async def test_dry_run_records_what_would_have_been_decided(tmp_path: Path) -> None:
    from authz_server.decision import DecisionSettings

    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")])
    pipeline = Pipeline(runtime, settings=DecisionSettings(dry_run=True), observers=[audit.observe])
    audit.start()
    would_deny = await pipeline.decide(facts_for("/private/1"), now=time.time())
    would_allow = await pipeline.decide(facts_for("/public/1"), now=time.time())
    await audit.stop()
    runtime.close()
    by_id = {r["decision_id"]: r for r in jsonl(tmp_path / "audit.jsonl")}
    denied, allowed = by_id[would_deny.decision_id], by_id[would_allow.decision_id]
    assert (denied["allowed"], denied["dry_run"], denied["would_allow"], denied["reason"]) == \
        (True, True, False, "policy_denied")
    assert (allowed["allowed"], allowed["dry_run"], allowed["would_allow"]) == (True, True, True)


async def test_http_front_decisions_are_recorded_too(tmp_path: Path) -> None:
    import httpx

    log_file = tmp_path / "audit.jsonl"
    config = Config(policies=str(write_audit_policy(tmp_path / "policies")), addr="", http_addr="127.0.0.1:0",
                    metrics_addr="", audit=(f"file:{log_file}",))
    async with running_app(config) as app:
        assert app.audit is not None
        async with httpx.AsyncClient(base_url=f"http://{app.bound['http_addr']}", timeout=5) as client:
            ok = await client.get("/check/public/x?token=tok-123456789", headers={"authorization": "Bearer abc.def.ghi"})
            no = await client.get("/check/private/x", headers={"cookie": "sid=cookie-secret-1"})
        await app.audit.drain()
    assert (ok.status_code, no.status_code) == (200, 403)
    records = list(jsonl(log_file))
    assert [(r["transport"], r["allowed"]) for r in records] == [("http", True), ("http", False)]
    text = log_file.read_text()
    assert "tok-123456789" not in text and "abc.def.ghi" not in text and "cookie-secret-1" not in text
    assert records[0]["input"]["attributes"]["request"]["http"]["headers"]["authorization"] == "Bearer [REDACTED]"


def _counting_offers(audit: AuditLog) -> list[int]:
    """How many records each hand-over gave the (one) writer."""
    offered: list[int] = []
    writer = audit.writers[0]
    offer = writer.offer

    def counting(records: Sequence[Any]) -> None:
        offered.append(len(records))
        offer(records)

    writer.offer = counting  # type: ignore[method-assign]
    return offered


def _one_pass(audit: AuditLog, idle: bool = False) -> float | None:
    """Run one build pass by hand and cancel the next one it scheduled; return in how many
    seconds that one was due (None: at once, the loop's next turn)."""
    if audit._next_pass is not None:
        audit._next_pass.cancel()  # the one start() scheduled
    audit._pass(idle)
    scheduled = audit._next_pass
    assert scheduled is not None
    scheduled.cancel()
    if isinstance(scheduled, asyncio.TimerHandle):
        return scheduled.when() - asyncio.get_running_loop().time()
    return None


async def test_built_records_linger_then_go_to_the_writers_in_batches(tmp_path: Path) -> None:
    """Passes build often (short slices on the event loop) but hand records over by the linger
    or by full batches. Driven by hand, one pass at a time, so no timing decides the outcome."""
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")], batch_size=4, linger=60.0, slice_seconds=60.0)
    audit.start()
    offered = _counting_offers(audit)
    pipeline = Pipeline(runtime, observers=[audit.observe])
    now = time.time()
    for i in range(6):
        await pipeline.decide(facts_for(f"/public/{i}"), now=now)
    _one_pass(audit)  # what happens when the build timer fires
    assert offered == [4] and audit.built == 6 and audit.pending == 2  # a full batch went, two wait
    _one_pass(audit)
    assert offered == [4]  # not lingered long enough yet
    audit._held_since -= 60.0
    _one_pass(audit)
    assert offered == [4, 2] and audit.pending == 0
    await pipeline.decide(facts_for("/public/6"), now=now)
    await audit.drain()  # drain (and stop): everything built goes now
    assert offered == [4, 2, 1] and audit.pending == 0
    await audit.stop()
    runtime.close()


async def test_idle_the_passes_wait_a_linger_and_hand_over_what_came_meanwhile(tmp_path: Path) -> None:
    """Idle (nothing came since the last pass), the audit log does not wake the loop 200 times
    a second: the next pass comes a whole linger later, and what came during that wait has
    lingered enough to go at once. Busy, a pass comes every ``build_every`` and holds what it
    built."""
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")], linger=60.0, build_every=5.0, slice_seconds=60.0)
    audit.start()
    offered = _counting_offers(audit)
    pipeline = Pipeline(runtime)  # observed by hand below
    made = [(await pipeline.decide(facts, now=time.time()), facts)
            for facts in (facts_for("/public/a"), facts_for("/public/b"), facts_for("/public/c"))]
    assert _one_pass(audit, idle=True) == pytest.approx(60.0, abs=20.0)  # nothing came: idle again
    for decision, facts in made[:2]:  # two arrive while the audit log waits, idle
        audit.observe(decision, facts, time.time())
    next_in = _one_pass(audit, idle=True)
    assert offered == [2] and audit.pending == 0  # at once
    assert next_in == pytest.approx(5.0, abs=2.0)  # records came: busy again, the next pass after build_every

    audit.observe(*made[2], time.time())  # arrives while busy
    next_in = _one_pass(audit)
    assert offered == [2] and audit.pending == 1 and audit.built == 3  # built, held
    assert next_in == pytest.approx(5.0, abs=2.0)  # the next pass comes after build_every
    await audit.stop()
    runtime.close()


async def test_a_pass_holds_the_loop_one_slice_and_the_rest_follows_at_once(tmp_path: Path) -> None:
    """However many are queued, one pass builds for ``slice_seconds`` (here: one record each)
    and gives the loop back; the next pass is due at once, after the loop polls its sockets."""
    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")], linger=60.0, slice_seconds=0.0)
    audit.start()
    pipeline = Pipeline(runtime, observers=[audit.observe])
    for i in range(3):
        await pipeline.decide(facts_for(f"/public/{i}"), now=time.time())
    assert _one_pass(audit) is None and audit.built == 1 and len(audit.queue) == 2
    audit._next_pass = None
    audit._pass()  # this time the scheduled passes run: the loop's next turns build the rest
    for _ in range(5):
        await asyncio.sleep(0)
    assert audit.built == 3 and not audit.queue
    await audit.stop()
    runtime.close()
