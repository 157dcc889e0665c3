"""The control plane as one part of the server: bundles, status reports and decision logs,
built from ``ControlPlane`` config and started and stopped with the app (``server.build_app``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..tasks import cancel_all
from ..policy.loader import PolicyRuntime
from .config import ControlPlane
from .manager import BundleManager
from .service import ServiceClient
from .status import DecisionLogStatus, StatusReporter, StatusSnapshot

if TYPE_CHECKING:
    from ..audit.sinks.http import HttpDecisionLogSink


class ControlPlaneClient:
    def __init__(self, plane: ControlPlane, runtime: PolicyRuntime, *, labels: Mapping[str, str],
                 shadow_runtime: PolicyRuntime | None = None) -> None:
        self.plane = plane
        self.labels = dict(labels)
        self.clients = {name: ServiceClient(service) for name, service in plane.services.items()}
        self.decision_log_status = DecisionLogStatus() if plane.decision_logs is not None else None
        self.reporter = (StatusReporter(self.clients[plane.status.service], plane.status.resource, self.snapshot)
                         if plane.status is not None else None)
        self.bundles = (BundleManager(plane, runtime, self.clients, shadow_runtime=shadow_runtime,
                                      on_status=self.changed) if plane.bundles else None)
        self._runtime = runtime
        self._tasks: list[asyncio.Task[None]] = []

    def decision_log_sink(self) -> "HttpDecisionLogSink | None":
        """The ``decision_logs`` sink, for the audit log's sinks (a client of its own: the sink
        closes it)."""
        config = self.plane.decision_logs
        if config is None:
            return None
        from ..audit.logrules import DecisionLogRules
        from ..audit.sinks.http import HttpDecisionLogSink

        runtime = self._runtime
        rules = DecisionLogRules(lambda: runtime.active.policy_set if runtime.active is not None else None,
                                 drop_path=config.drop_decision, mask_path=config.mask_decision)
        return HttpDecisionLogSink(config, ServiceClient(self.plane.services[config.service]), rules=rules,
                                   status=self.decision_log_status, on_status=self.changed)

    def snapshot(self) -> StatusSnapshot:
        return StatusSnapshot(labels=self.labels, bundles=self.bundles.status if self.bundles is not None else {},
                              decision_logs=self.decision_log_status)

    def changed(self) -> None:
        if self.reporter is not None:
            self.reporter.changed()

    async def start(self) -> None:
        if self.reporter is not None:
            self._tasks.append(asyncio.create_task(self.reporter.run(), name="status reports"))
            self.reporter.changed()
        if self.bundles is not None:
            await self.bundles.start()

    async def stop(self) -> None:
        if self.bundles is not None:
            await self.bundles.stop()
        if self.reporter is not None:  # a last report, so the control plane sees the stop's state
            try:
                await asyncio.wait_for(self.reporter.send(), 2.0)
            except (Exception, asyncio.TimeoutError):
                pass
        await cancel_all(self._tasks)
        for client in self.clients.values():
            await client.close()

    def collect(self) -> Iterable[object]:
        if self.bundles is None:
            return
        activations = GaugeMetricFamily("authz_bundle_last_activation_timestamp_seconds",
                                        "When each bundle's serving revision was activated", labels=["name"])
        failing = GaugeMetricFamily("authz_bundle_failing", "1 while a bundle's last download or activation failed "
                                    "(the status report and the log say why)", labels=["name"])
        for name, status in self.bundles.status.items():
            activations.add_metric([name], status.last_successful_activation or 0.0)
            failing.add_metric([name], 1.0 if status.code else 0.0)
        yield activations
        yield failing
        if self.reporter is not None:
            reports = CounterMetricFamily("authz_status_reports", "Status reports sent, by result", labels=["result"])
            reports.add_metric(["ok"], self.reporter.sent)
            reports.add_metric(["failed"], self.reporter.failures)
            yield reports


__all__ = ["ControlPlaneClient"]
