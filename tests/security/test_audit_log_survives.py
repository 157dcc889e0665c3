"""No record can end the audit log (issue 23's hardening, issue 28's dispatcher).

An anonymous caller sends a JSON body nested 900 deep: the decision is answered, but its
record cannot be walked for redaction (Python's recursion limit). Before, the failure's own
handler raised (``RateLimitedLog.warning`` did not take ``exc_info``: a ``TypeError``) and the
dispatcher task died with it: every later decision went unrecorded, silently. Now the
failure is counted (``render_failed``), a short record says the decision happened and why its
details are missing, and the records after it are written in full.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grpc

from authz_server.audit import AuditLog
from authz_server.audit.sinks.file import FileSink
from authz_server.audit.writer import RateLimitedLog
from authz_server.config import Config
from authz_server.decision import Decision, Pipeline
from authz_server.policy.loader import PolicyRuntime
from tests.support.audit import (TRUST_DOMAIN, check_request_bytes, facts_for, grpc_check, jsonl, workload,
                                 write_audit_policy)
from tests.support.authz import running_app

DEEP_BODY = "[" * 900 + "]" * 900


def _dropped(audit: AuditLog, reason: str) -> float:
    families = {family.name: family for family in audit.collect()}
    return sum(sample.value for sample in families["authz_audit_records_dropped"].samples
               if sample.labels == {"sink": "all", "reason": reason})


async def test_a_900_deep_body_through_the_server_costs_only_its_own_record(tmp_path: Path) -> None:
    log_file = tmp_path / "audit.jsonl"
    config = Config(policies=str(write_audit_policy(tmp_path / "policies")), addr="127.0.0.1:0", metrics_addr="",
                    trust_domains=(TRUST_DOMAIN,), audit=(f"file:{log_file}",))
    async with running_app(config) as app:
        assert app.audit is not None
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = grpc_check(channel)
            deep = await check(check_request_bytes("/public/deep", method="POST", body=DEEP_BODY,
                                                   headers={"content-type": "application/json"},
                                                   request_id="deep-1"))
            later = [await check(check_request_bytes(f"/public/after-{i}", principal=workload("web"),
                                                     request_id=f"after-{i}")) for i in range(20)]
        await app.audit.drain()
        assert _dropped(app.audit, "render_failed") == 1
        exposition = app.metrics.exposition().decode()
    assert deep.status.code == 0 and all(r.status.code == 0 for r in later)
    records = list(jsonl(log_file))
    assert len(records) == 21  # one per decision: the deep one short, every later one whole
    short = records[0]
    assert short["audit_error"] == "record_failed: RecursionError"
    assert "input" not in short and short["erased"] == ["/input", "/result"]
    assert (short["allowed"], short["reason"], short["transport"]) == (True, "allowed", "grpc")
    assert [r["request_id"] for r in records[1:]] == [f"after-{i}" for i in range(20)]
    assert all("audit_error" not in r and r["input"]["parsed_path"][0] == "public" for r in records[1:])
    assert 'authz_audit_records_dropped_total{reason="render_failed",sink="all"} 1.0' in exposition


async def test_a_record_whose_short_form_fails_too_is_counted_and_the_next_is_written(tmp_path: Path) -> None:
    """A decision broken enough that neither record can be made (here: an ``http_status``
    that is no number, and a ``decision_id`` whose ``str`` raises) costs one count."""

    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no text for you")

    runtime = PolicyRuntime(str(write_audit_policy(tmp_path / "policies")))
    runtime.load()
    audit = AuditLog([FileSink(tmp_path / "audit.jsonl")], linger=0.001)
    pipeline = Pipeline(runtime, observers=[audit.observe])
    audit.start()
    broken: Any = Decision(allowed=True, code="allowed", reason="allowed", http_status="two hundred",  # type: ignore[arg-type]
                           decision_id=Unprintable())  # type: ignore[arg-type]
    audit.observe(broken, facts_for("/public/broken"), time.time())
    audit.observe(broken, None, time.time())
    after = [await pipeline.decide(facts_for(f"/public/{i}"), now=time.time()) for i in range(5)]
    await audit.drain()
    assert _dropped(audit, "render_failed") == 2
    await audit.stop()
    runtime.close()
    assert [r["decision_id"] for r in jsonl(tmp_path / "audit.jsonl")] == [d.decision_id for d in after]


def test_the_rate_limited_log_takes_exc_info(caplog: Any) -> None:
    """The handler's own bug: ``warning(..., exc_info=...)`` raised ``TypeError``."""
    limited = RateLimitedLog(logging.getLogger("test.audit.survives"), interval=0.0)
    try:
        raise RecursionError("deep")
    except RecursionError as exc:
        with caplog.at_level(logging.WARNING, logger="test.audit.survives"):
            limited.warning("record %s failed", "d-1", exc_info=exc)
            limited.warning("record %s failed", "d-2", exc_info=True)
    assert [r.getMessage() for r in caplog.records] == ["record d-1 failed", "record d-2 failed"]
    assert caplog.records[0].exc_info is not None and caplog.records[0].exc_info[0] is RecursionError
