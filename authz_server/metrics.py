"""Prometheus metrics: one registry per server (no process globals), served at ``/metrics``.

Decision counters are labelled by result and error code, the same code that is in the audit
record and the denied body. Values that other objects already count (cache statistics,
policy reload status) are read at scrape time by a collector instead of being mirrored on
the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .http import HttpRequest, HttpResponse

if TYPE_CHECKING:
    from .decision import Decision, Pipeline
    from .facts import Facts
    from .policy.loader import PolicyRuntime

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class LatencyHistogram:
    """Counts per bucket in a plain list: one bisect and one add per request."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def family_samples(self) -> tuple[list[tuple[str, float]], float]:
        buckets, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets, self.total


class Metrics:
    """Counted on the hot path in plain ints (a prometheus_client call costs a lock per
    request); turned into Prometheus families when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.decisions: dict[tuple[bool, str, bool], int] = {}  # (allowed, code, cached) -> count
        self.latency = {"grpc": LatencyHistogram(), "http": LatencyHistogram()}
        self.registry.register(_FunctionCollector(self._collect))

    def observe_decision(self, decision: "Decision", facts: "Facts | None", now: float) -> None:
        key = (decision.allowed, decision.code, decision.cached)
        decisions = self.decisions
        decisions[key] = decisions.get(key, 0) + 1

    def observe_latency(self, seconds: float, transport: str) -> None:
        self.latency[transport].observe(seconds)

    def _collect(self) -> Iterable[object]:
        decisions = CounterMetricFamily("authz_decisions", "Decisions made, by result and code",
                                        labels=["result", "code", "cached"])
        for (allowed, code, cached), count in sorted(self.decisions.items()):
            decisions.add_metric(["allow" if allowed else "deny", code, "true" if cached else "false"], count)
        yield decisions
        latency = HistogramMetricFamily("authz_decision_duration_seconds",
                                        "Time to decide, from request to response", labels=["transport"])
        for transport, histogram in self.latency.items():
            buckets, total = histogram.family_samples()
            latency.add_metric([transport], buckets, total)
        yield latency

    def watch(self, collect: Callable[[], Iterable[object]]) -> None:
        self.registry.register(_FunctionCollector(collect))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def http_handler(self, request: HttpRequest) -> HttpResponse:
        if request.path != "/metrics":
            return HttpResponse(404, [("content-type", "text/plain")], b"not found: try /metrics\n")
        return HttpResponse(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], self.exposition())


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[object]]) -> None:
        self._collect = collect

    def collect(self):  # type: ignore[override]
        yield from self._collect()  # type: ignore[misc]


def pipeline_collector(pipeline: "Pipeline", runtime: "PolicyRuntime") -> Callable[[], Iterable[object]]:
    """Cache and policy state, read when Prometheus scrapes."""

    def collect() -> Iterable[object]:
        stats = pipeline.cache.stats
        cache = CounterMetricFamily("authz_decision_cache", "Decision cache lookups by outcome", labels=["outcome"])
        cache.add_metric(["hit"], stats.hits)
        cache.add_metric(["miss"], stats.misses)
        yield cache
        evictions = CounterMetricFamily("authz_decision_cache_evictions", "Entries dropped to stay within the bound")
        evictions.add_metric([], stats.evictions)
        yield evictions
        invalidations = CounterMetricFamily("authz_decision_cache_invalidations",
                                            "Times the whole cache was dropped (policy or data changed)")
        invalidations.add_metric([], stats.invalidations)
        yield invalidations
        size = GaugeMetricFamily("authz_decision_cache_entries", "Entries in the decision cache")
        size.add_metric([], len(pipeline.cache))
        yield size
        reloads = CounterMetricFamily("authz_policy_reloads", "Policy loads by result", labels=["result"])
        reloads.add_metric(["ok"], runtime.status.reloads_ok)
        reloads.add_metric(["failed"], runtime.status.reloads_failed)
        yield reloads
        current = GaugeMetricFamily("authz_policy_reload_current",
                                    "1 when the policy on disk is the one serving, 0 after a rejected reload")
        current.add_metric([], 1.0 if runtime.status.current and runtime.active else 0.0)
        yield current
        if runtime.active is not None:
            info = InfoMetricFamily("authz_policy", "The policy set serving decisions")
            info.add_metric([], {"version": runtime.active.version, "root": runtime.root})
            yield info
        timeouts = CounterMetricFamily("authz_policy_timeouts", "Evaluations stopped at the deadline")
        timeouts.add_metric([], runtime.status.timeouts)
        yield timeouts

    return collect


async def aggregate_worker_metrics(request: HttpRequest, sockets: list[str]) -> HttpResponse:
    """The supervisor's ``/metrics``: every worker's samples, each with a ``worker`` label."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    if request.path != "/metrics":
        return HttpResponse(404, [("content-type", "text/plain")], b"not found: try /metrics\n")
    families: dict[str, Any] = {}
    for index, path in enumerate(sockets):
        try:
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), timeout=2.0) as client:
                text = (await client.get("http://worker/metrics")).text
        except httpx.HTTPError:
            continue  # a worker that is restarting is simply absent from this scrape
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            labelled = [Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)
                        for s in family.samples]
            if merged is family:
                family.samples = labelled
            else:
                merged.samples.extend(labelled)
    registry = CollectorRegistry()
    registry.register(_FunctionCollector(lambda: list(families.values())))
    return HttpResponse(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], generate_latest(registry))


def identity_collector(identity: Any) -> Callable[[], Iterable[object]]:
    """Sessions, tokens and trusted issuers' key sets, read when Prometheus scrapes."""

    def collect() -> Iterable[object]:
        stats = identity.stats
        events = CounterMetricFamily("authz_identity_events", "Identity outcomes by kind", labels=["event"])
        for event in ("sessions_created", "session_lookups", "tokens_validated", "replays", "stolen_sessions",
                      "delegations"):
            events.add_metric([event], getattr(stats, event))
        yield events
        store = identity.store
        if store is not None:
            kind = type(store).__name__.replace("Store", "").lower()
            lookups = CounterMetricFamily("authz_session_store_lookups", "Session store lookups by outcome",
                                          labels=["store", "outcome"])
            for outcome in ("hits", "misses", "near_hits", "errors"):
                lookups.add_metric([kind, outcome], getattr(store.stats, outcome))
            yield lookups
            subscribed = getattr(store, "subscribed", None)
            if subscribed is not None:  # a shared store: its revocation feed and what waits for it
                yield GaugeMetricFamily("authz_session_feed_up", "1 while the revocation feed is subscribed",
                                        value=1.0 if subscribed.is_set() else 0.0)
                yield GaugeMetricFamily("authz_session_revocations_pending",
                                        "Revocations enforced here that the store has not taken yet",
                                        value=store.pending_revocations)
        tokens = identity.tokens
        if tokens is not None and hasattr(tokens, "status"):
            refreshes = CounterMetricFamily("authz_jwks_refreshes", "Key set fetches by issuer and result",
                                            labels=["issuer", "result"])
            usable = GaugeMetricFamily("authz_jwks_available", "1 while the issuer's keys are usable",
                                       labels=["issuer"])
            stale = GaugeMetricFamily("authz_jwks_stale", "1 while serving keys past their freshness",
                                      labels=["issuer"])
            for status in tokens.status():
                refreshes.add_metric([status.issuer, "ok"], status.refreshes)
                refreshes.add_metric([status.issuer, "failed"], status.failures)
                usable.add_metric([status.issuer], 1.0 if status.available else 0.0)
                stale.add_metric([status.issuer], 1.0 if status.stale else 0.0)
            yield refreshes
            yield usable
            yield stale

    return collect


def signals_collector(signals: Any) -> Callable[[], Iterable[object]]:
    def collect() -> Iterable[object]:
        family = CounterMetricFamily("authz_signals", "Requests a signal flagged, by signal", labels=["signal"])
        for name in ("throttled", "anomalous", "threat_hits", "credential_stuffing"):
            family.add_metric([name], getattr(signals.stats, name))
        yield family
        lists = GaugeMetricFamily("authz_threat_list_entries", "Entries per threat list", labels=["list"])
        errors = GaugeMetricFamily("authz_threat_list_error", "1 while a list's last reload failed", labels=["list"])
        for name, status in signals.threats.status().items():
            lists.add_metric([name], status["entries"])
            errors.add_metric([name], 1.0 if status["error"] else 0.0)
        yield lists
        yield errors

    return collect
