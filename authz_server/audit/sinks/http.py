"""Decision logs to an OPA decision-log service: ``decision_logs`` in the config.

OPA's decision-log API: events are POSTed to ``<service url><resource>`` (default ``/logs``)
as a gzip-compressed JSON array (``Content-Encoding: gzip``, ``Content-Type:
application/json``), each upload at most ``upload_size_limit_bytes`` compressed; uploads run
every ``min_delay_seconds``..``max_delay_seconds`` (uniformly drawn), and after a failure
after OPA's backoff, keeping the chunks to send again. The events are our audit records,
already redacted, which follow OPA's event shape (``decision_id``, ``labels``, ``bundles``,
``path``, ``input``, ``result``, ``timestamp``, ``metrics``, ``requested_by``, ``erased``,
``masked``), after the Rego drop and mask rules (``logrules``).

Memory is bounded by ``buffer_size_limit_bytes``: compressed chunks waiting for the
collector plus events not yet compressed. When a new chunk would pass it, the oldest chunks
are dropped (OPA's size buffer), and every dropped event is counted by reason
(``buffer_full``, ``too_large`` for one event over the upload limit, ``drop_rule``,
``rule_error``, ``shutdown``). As a sink behind ``SinkWriter`` it never asks to be retried:
a batch is taken into the buffer at once, so a collector that is down never holds back the
audit log's other sinks, and decisions never wait for any of it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import random

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ...errors import AuthzError
from ..record import AuditRecord
from .base import in_worker_thread

if TYPE_CHECKING:
    from ...bundles.config import DecisionLogsConfig
    from ...bundles.service import ServiceClient
    from ...bundles.status import DecisionLogStatus
    from ..logrules import DecisionLogRules

log = logging.getLogger("authz_server.audit")


def encode_chunks(events: Sequence[bytes], limit: int, ratio: float = 1.0) -> tuple[list[tuple[bytes, int]], int]:
    """``events`` (JSON each) as gzip JSON arrays of at most ``limit`` bytes, in order. Events
    are grouped so that each group should compress to about 90 % of the limit (``ratio``: the
    compression ratio seen so far); a group that compresses too large is halved; a single
    event that does not fit is left out. Returns the chunks with their event counts, and how
    many events were left out."""
    chunks: list[tuple[bytes, int]] = []
    too_large = 0
    budget = limit * ratio * 0.9
    groups: list[list[bytes]] = []
    size = budget
    for event in events:
        if size + len(event) > budget:
            groups.append([])
            size = 0
        groups[-1].append(event)
        size += len(event) + 1
    stack = list(reversed(groups))
    while stack:
        part = stack.pop()
        body = gzip.compress(b"[" + b",".join(part) + b"]", compresslevel=6, mtime=0)
        if len(body) <= limit:
            chunks.append((body, len(part)))
        elif len(part) == 1:
            too_large += 1
        else:
            middle = len(part) // 2
            stack.append(part[middle:])
            stack.append(part[:middle])
    return chunks, too_large


@dataclass
class UploadStats:
    uploaded: int = 0  # events the collector accepted
    uploads: int = 0
    failures: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, count: int) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


class HttpDecisionLogSink:
    def __init__(self, config: "DecisionLogsConfig", client: "ServiceClient", *,
                 rules: "DecisionLogRules | None" = None, status: "DecisionLogStatus | None" = None,
                 on_status: Callable[[], None] = lambda: None, rand: Any = random.random) -> None:
        self.config = config
        self.client = client
        self.rules = rules
        self.status = status
        self.on_status = on_status  # the status report owes the control plane this change
        self.name = f"decision_logs:{client.name}{config.resource}"
        self.stats = UploadStats()
        self.cpu_seconds = 0.0
        self._rand = rand
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._chunk_bytes = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._ratio = 8.0  # uncompressed / compressed, learnt from each chunk
        self._task: asyncio.Task[None] | None = None
        self._upload_lock = asyncio.Lock()
        self._seal_lock = asyncio.Lock()
        self._retries = 0

    @property
    def buffered_bytes(self) -> int:
        return self._chunk_bytes + self._pending_bytes

    @property
    def buffered_events(self) -> int:
        return sum(count for _, count in self._chunks) + len(self._pending)

    # -- the Sink protocol
    async def write_batch(self, records: Sequence[AuditRecord]) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"audit upload {self.name}")
        events = await in_worker_thread(self, self._prepare, records)  # Rego rules and JSON: off the event loop
        self._pending.extend(events)
        self._pending_bytes += sum(len(event) for event in events)
        if self._pending_bytes >= self.config.upload_size_limit * self._ratio * 0.9:
            await self._seal()
        self._bound()

    async def close(self) -> None:
        """Upload what is buffered (the writer bounds how long this may take), then stop."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        try:
            await self.upload()
        finally:
            self.stats.drop("shutdown", self.buffered_events)
            self._chunks.clear()
            self._pending.clear()
            self._chunk_bytes = self._pending_bytes = 0
            if self.rules is not None:
                self.rules.close()
            await self.client.close()

    # -- preparing events (in a worker thread)
    def _prepare(self, records: Iterable[AuditRecord]) -> list[bytes]:
        if self.rules is None:
            return [record.encoded for record in records]
        events = []
        for record in records:
            event = json.loads(record.line)
            try:
                keep = self.rules.apply(event)
            except (AuthzError, ValueError) as exc:
                self.stats.drop("rule_error", 1)
                log.warning("decision %s not logged: its mask/drop rule failed: %s", record.decision_id, exc)
                continue
            if not keep:
                self.stats.drop("drop_rule", 1)
                continue
            events.append(json.dumps(event, separators=(",", ":")).encode("utf-8", "surrogateescape"))
        return events

    # -- the buffer
    async def _seal(self) -> None:
        """Compress the pending events into chunks (in a worker thread)."""
        async with self._seal_lock:
            if not self._pending:
                return
            pending, uncompressed = self._pending, self._pending_bytes
            self._pending, self._pending_bytes = [], 0
            chunks, too_large = await in_worker_thread(self, encode_chunks, pending, self.config.upload_size_limit,
                                                          self._ratio)
            self.stats.drop("too_large", too_large)
            compressed = sum(len(body) for body, _ in chunks)
            if compressed:
                self._ratio = max(1.0, (uncompressed + len(pending)) / compressed)
            for chunk in chunks:
                self._chunks.append(chunk)
                self._chunk_bytes += len(chunk[0])
            self._bound()

    def _bound(self) -> None:
        """Drop the oldest chunks (then the oldest pending events) until under the limit."""
        limit = self.config.buffer_size_limit
        while self.buffered_bytes > limit and self._chunks:
            body, count = self._chunks.popleft()
            self._chunk_bytes -= len(body)
            self.stats.drop("buffer_full", count)
        dropped = 0
        while self.buffered_bytes > limit and dropped < len(self._pending):
            self._pending_bytes -= len(self._pending[dropped])
            dropped += 1
        if dropped:
            del self._pending[:dropped]
            self.stats.drop("buffer_full", dropped)

    # -- uploading
    async def upload(self) -> bool:
        """Send every buffered chunk; False when the collector failed (the rest stays)."""
        async with self._upload_lock:
            await self._seal()
            while self._chunks:
                body, count = self._chunks[0]
                try:
                    reply = await self.client.request(
                        "POST", self.config.resource, content=body,
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
                    ok = 200 <= reply.status < 300
                    error, http_code = ("" if ok else f"log upload failed, server replied with HTTP {reply.status}",
                                        0 if ok else reply.status)
                except AuthzError as exc:
                    ok, error, http_code = False, exc.message, 0
                if not ok:
                    self.stats.failures += 1
                    self._set_status(error, http_code)
                    return False
                if self._chunks and self._chunks[0][0] is body:
                    self._chunks.popleft()
                    self._chunk_bytes -= len(body)
                self.stats.uploads += 1
                self.stats.uploaded += count
            self._set_status("", 0)
            return True

    def _set_status(self, message: str, http_code: int) -> None:
        if self.status is not None and self.status.message != message:
            self.status.message, self.status.http_code = message, http_code
            if message:
                log.warning("decision logs: %s (%d events buffered)", message, self.buffered_events)
            self.on_status()

    def next_delay(self, ok: bool) -> float:
        from ...bundles.download import backoff

        if ok:
            self._retries = 0
            low, high = self.config.min_delay, self.config.max_delay
            return low + (high - low) * self._rand()
        self._retries += 1
        return backoff(self._retries, self.config.max_delay, rand=self._rand)

    async def _run(self) -> None:
        ok = True
        while True:
            await asyncio.sleep(self.next_delay(ok))
            ok = await self.upload()

    # -- metrics, read when scraped
    def collect(self) -> Iterable[object]:
        uploaded = CounterMetricFamily("authz_decision_logs_uploaded", "Decision events the collector accepted")
        uploaded.add_metric([], self.stats.uploaded)
        failures = CounterMetricFamily("authz_decision_logs_upload_failures", "Uploads the collector failed")
        failures.add_metric([], self.stats.failures)
        dropped = CounterMetricFamily("authz_decision_logs_dropped",
                                      "Decision events not uploaded: buffer_full, too_large, drop_rule, rule_error, "
                                      "shutdown", labels=["reason"])
        for reason in ("buffer_full", "too_large", "drop_rule", "rule_error", "shutdown"):
            dropped.add_metric([reason], self.stats.dropped.get(reason, 0))
        buffered = GaugeMetricFamily("authz_decision_logs_buffer_bytes", "Bytes waiting for the collector")
        buffered.add_metric([], self.buffered_bytes)
        events = GaugeMetricFamily("authz_decision_logs_buffer_events", "Events waiting for the collector")
        events.add_metric([], self.buffered_events)
        yield from (uploaded, failures, dropped, buffered, events)


__all__ = ["HttpDecisionLogSink", "encode_chunks"]
