"""The shadow policy beside the live one: sampled on the request path, decided off it.

On the request path ``observe`` (a pipeline observer) costs one sample draw and one append
to a bounded queue (a full queue counts a drop): the live answer never waits for the shadow.
A background task takes the queue in batches and hands each batch to a worker thread, which
builds the input document each sampled request had, evaluates the shadow policy
(``evaluate_shadow``, the one place it meets the engine) and compares the outcomes. Back on
the event loop, disagreements are counted by kind and written to the audit log, one record
each with both results (``type: shadow``, redacted like every record).

A stuck shadow evaluation only stalls the shadow (its queue then drops and counts); a
request refused before the policy was asked is not compared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from ..tasks import cancel_all
from ..audit.record import AuditRecord, build_document
from ..errors import AuthzError
from ..facts import build_input
from ..policy.engine import encode_input
from ..policy.loader import ActivePolicy, PolicyRuntime
from .compare import KINDS, Outcome, disagreement, live_outcome, shadow_outcome

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..decision import Decision
    from ..facts import Facts

log = logging.getLogger("authz_server.shadow")


def evaluate_shadow(active: ActivePolicy, document: Any) -> Any:
    """The one place the shadow policy is evaluated (on a worker thread, no deadline)."""
    return active.pool.evaluate_now(encode_input(document))


@dataclass
class ShadowStats:
    compared: int = 0
    agreed: int = 0
    disagreements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    errors: int = 0  # shadow evaluations that gave no usable answer (they count as denies too)
    dropped: int = 0  # sampled requests the queue had no room for
    unsampled: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"compared": self.compared, "agreed": self.agreed, "disagreements": dict(self.disagreements),
                "errors": self.errors, "dropped": self.dropped}


@dataclass(frozen=True)
class Comparison:
    decision: "Decision"
    facts: "Facts"
    now: float
    live: Outcome
    shadow: Outcome
    kind: str | None
    shadow_result: Any
    input: dict[str, Any] | None


class ShadowEvaluator:
    def __init__(self, runtime: PolicyRuntime, *, sample: float = 1.0, deny_status: int = 403,
                 audit: "AuditLog | None" = None, queue_size: int = 10_000, batch_size: int = 256,
                 rand: Callable[[], float] = random.random) -> None:
        self.runtime = runtime
        self.sample = sample
        self.deny_status = deny_status
        self.audit = audit
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.stats = ShadowStats()
        self._queue: deque[tuple["Decision", "Facts", float]] = deque()
        self._wake = asyncio.Event()
        self._rand = rand
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0

    # -- on the request path
    def observe(self, decision: "Decision", facts: "Facts | None", now: float) -> None:
        if facts is None or decision.phase != "policy":
            return
        if self.sample < 1.0 and self._rand() >= self.sample:
            self.stats.unsampled += 1
            return
        queue = self._queue
        if len(queue) >= self.queue_size:
            self.stats.dropped += 1
            return
        queue.append((decision, facts, now))
        if not self._wake.is_set():
            self._wake.set()

    # -- off it
    async def start(self, *, folder: bool) -> None:
        """Start comparing; with a folder shadow, load it first and follow its changes."""
        if folder:
            try:
                await asyncio.to_thread(self.runtime.load)
            except AuthzError:
                pass  # logged by the runtime; its watcher keeps trying
            self._tasks.append(asyncio.create_task(self.runtime.watch(), name="shadow policy watch"))
        self._tasks.append(asyncio.create_task(self.run(), name="shadow"))

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self.runtime.close()

    async def run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            active = self.runtime.active
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            if active is None:
                continue  # no shadow policy yet: nothing to compare with
            self._in_flight = len(batch)
            try:
                comparisons = await asyncio.to_thread(self.compare, active, batch)
                self._record(active, comparisons)
            finally:
                self._in_flight = 0

    async def drain(self) -> None:
        """Return once everything observed so far is compared (tests and benchmarks)."""
        while self._queue or self._in_flight:
            await asyncio.sleep(0.01)

    def compare(self, active: ActivePolicy, batch: Iterable[tuple["Decision", "Facts", float]]) -> list[Comparison]:
        """Decide each request with the shadow policy and compare (runs on a worker thread)."""
        out = []
        for decision, facts, now in batch:
            live = live_outcome(decision)
            if live is None:
                continue
            document = None
            if decision.policy_version == active.version:
                shadow, result = live, decision.result  # the same policy: the same answer
            else:
                try:
                    document = build_input(facts, decision.identity.document, decision.signals)
                    result = evaluate_shadow(active, document)
                    shadow = shadow_outcome(result, deny_status=self.deny_status)
                except AuthzError as exc:
                    result, shadow = None, Outcome(False, self.deny_status, error=exc.code)
                except Exception as exc:  # a shadow bug must never reach the live path or stop the shadow
                    log.exception("shadow evaluation failed")
                    result, shadow = None, Outcome(False, self.deny_status, error=type(exc).__name__)
            out.append(Comparison(decision, facts, now, live, shadow, disagreement(live, shadow), result, document))
        return out

    def _record(self, active: ActivePolicy, comparisons: list[Comparison]) -> None:
        stats = self.stats
        for comparison in comparisons:
            stats.compared += 1
            stats.errors += bool(comparison.shadow.error)
            if comparison.kind is None:
                stats.agreed += 1
            else:
                stats.disagreements[comparison.kind] += 1
        if self.audit is None:
            return
        records = []
        for comparison in comparisons:
            if comparison.kind is not None:
                try:
                    records.append(self._audit_record(active, comparison))
                except Exception:  # a record that cannot be built costs that record only
                    log.exception("could not build the shadow record of decision %s",
                                  comparison.decision.decision_id)
        if records:
            for writer in self.audit.writers:
                writer.offer(records)

    def _audit_record(self, active: ActivePolicy, comparison: Comparison) -> AuditRecord:
        audit = self.audit
        assert audit is not None
        decision = comparison.decision
        document = build_document(decision, comparison.facts, comparison.now, handler_ns=0,
                                  path=audit.records.path, labels=audit.labels, input_document=comparison.input)
        document["decision_id"] = f"{decision.decision_id}.shadow"
        document["type"] = "shadow"
        document["shadow_of"] = decision.decision_id
        document["reason"] = f"shadow_{comparison.kind}"
        document["message"] = f"the shadow policy disagrees: {comparison.kind}"
        document["bundles"] = {"live": {"revision": decision.policy_version},
                               "shadow": {"revision": active.version}}
        document["shadow"] = {"kind": comparison.kind, "live": comparison.live.to_json(),
                              "shadow": {**comparison.shadow.to_json(), "result": comparison.shadow_result},
                              "policy": {"version": active.version, "revision": active.policy_set.revision},
                              "stats": self.stats.to_json()}
        document.pop("metrics", None)
        clean = audit.records.redactor.redact(document)
        return AuditRecord(decision_id=clean["decision_id"], timestamp=comparison.now, subject=clean["subject"],
                           spiffe_id=clean["spiffe_id"], allowed=decision.allowed, code=clean["reason"],
                           policy_version=active.version, document=clean,
                           line=json.dumps(clean, separators=(",", ":"), default=str))

    # -- metrics, read when scraped
    def collect(self) -> Iterable[object]:
        disagreements = CounterMetricFamily("authz_shadow_disagreements",
                                            "Sampled requests the shadow policy would have answered otherwise",
                                            labels=["kind"])
        for kind in KINDS:
            disagreements.add_metric([kind], self.stats.disagreements[kind])
        compared = CounterMetricFamily("authz_shadow_decisions", "Sampled requests decided by the shadow policy too")
        compared.add_metric([], self.stats.compared)
        errors = CounterMetricFamily("authz_shadow_errors", "Shadow evaluations without a usable answer")
        errors.add_metric([], self.stats.errors)
        dropped = CounterMetricFamily("authz_shadow_dropped", "Sampled requests not compared: the queue was full")
        dropped.add_metric([], self.stats.dropped)
        depth = GaugeMetricFamily("authz_shadow_queue_depth", "Sampled requests waiting for the shadow policy")
        depth.add_metric([], len(self._queue))
        yield from (disagreements, compared, errors, dropped, depth)
        active = self.runtime.active
        if active is not None:
            info = InfoMetricFamily("authz_shadow_policy", "The shadow policy set")
            info.add_metric([], {"version": active.version, "revision": active.policy_set.revision,
                                 "root": self.runtime.root})
            yield info
