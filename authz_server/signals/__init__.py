"""Signals about what is happening now, for policies: ``input.signals``.

``{"rate": {rate, limit, remaining, limited, retry_after}, "anomaly": {score, level, ...},
"threat": {listed, matches}, "sensitivity": "low"|"medium"|"high"}``. Each is cheap enough for
every request; see the modules for the formulas. ``Signals`` is the pipeline's
``SignalSource``: ``assess`` before the policy, ``record_outcome`` after it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..configkeys import only as _only
from ..configkeys import resolve_path
from ..durations import parse_duration
from ..errors import ConfigError, IdentityError
from ..sharedstate import parse_store_url
from .anomaly import AnomalyDetector, AnomalySettings
from .baselines import SharedBaselines
from .ratelimit import BucketSpec, MemoryRateLimiter, ObservedRate, RateLimiter, RedisRateLimiter
from .routes import RouteNormalizer
from .sensitivity import LEVELS, sensitivity_of
from .threatintel import ThreatIntel, ThreatSource


@dataclass(frozen=True)
class SignalsConfig:
    per_identity: BucketSpec | None = None
    per_route: BucketSpec | None = None
    rate_store: str = "memory"
    anomaly: AnomalySettings | None = field(default_factory=AnomalySettings)
    anomaly_store: str = "memory"  # or a shared-state URL: baselines shared by every replica (baselines.py)
    anomaly_sync_interval: float = 1.0
    threat_lists: tuple[ThreatSource, ...] = ()
    default_sensitivity: str = "medium"
    auth_failures: BucketSpec | None = None  # failed sign-ins a source may make before it is refused

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: str | None = None) -> "SignalsConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {data!r}", key="signals")
        _only(data, {"rate", "anomaly", "threat_lists", "default_sensitivity", "auth_failures"}, "signals.")
        values: dict[str, Any] = {}
        if "auth_failures" in data:
            values["auth_failures"] = _bucket(data["auth_failures"], "signals.auth_failures")
        rate = data.get("rate") or {}
        if not isinstance(rate, Mapping):
            raise ConfigError("expected a mapping", key="signals.rate")
        _only(rate, {"per_identity", "per_route", "store"}, "signals.rate.")
        for name in ("per_identity", "per_route"):
            if name in rate:
                values[name] = _bucket(rate[name], f"signals.rate.{name}")
        if "store" in rate:
            values["rate_store"] = _store(rate["store"], "signals.rate.store")
        if "anomaly" in data:
            values["anomaly"] = _anomaly(data["anomaly"])
            if isinstance(data["anomaly"], Mapping):
                if "store" in data["anomaly"]:
                    values["anomaly_store"] = _store(data["anomaly"]["store"], "signals.anomaly.store")
                if "sync_interval" in data["anomaly"]:
                    values["anomaly_sync_interval"] = _interval(data["anomaly"]["sync_interval"])
        if "threat_lists" in data:
            values["threat_lists"] = _threat_lists(data["threat_lists"], base_dir, resolve_path)
        if "default_sensitivity" in data:
            if data["default_sensitivity"] not in LEVELS:
                raise ConfigError(f"expected one of {', '.join(LEVELS)}", key="signals.default_sensitivity")
            values["default_sensitivity"] = data["default_sensitivity"]
        return cls(**values)


def _interval(value: Any) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key="signals.anomaly.sync_interval") from None
    if not 0.01 <= seconds <= 60:
        raise ConfigError("must be between 10ms and 60s", key="signals.anomaly.sync_interval")
    return seconds


def _store(value: Any, key: str) -> str:
    if value != "memory":
        parse_store_url(value, key=key)
    return str(value)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number, got {value!r}", key=key)
    return float(value)


def _bucket(value: Any, key: str) -> BucketSpec:
    if not isinstance(value, Mapping):
        raise ConfigError("expected {rate: N, burst: N}", key=key)
    _only(value, {"rate", "burst"}, f"{key}.")
    rate = _number(value.get("rate"), f"{key}.rate")
    burst = _number(value.get("burst", max(1.0, rate * 2)), f"{key}.burst")
    if rate <= 0:
        raise ConfigError("must be greater than zero (requests per second)", key=f"{key}.rate")
    if burst < 1:
        raise ConfigError("must be at least 1", key=f"{key}.burst")
    return BucketSpec(rate, burst)


def _anomaly(value: Any) -> AnomalySettings | None:
    if value is False:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError("expected a mapping, or false to turn it off", key="signals.anomaly")
    _only(value, {"threshold", "warmup", "learning_routes", "max_identities", "max_routes", "store", "sync_interval"},
          "signals.anomaly.")
    values: dict[str, Any] = {}
    if "threshold" in value:
        threshold = _number(value["threshold"], "signals.anomaly.threshold")
        if not 0 < threshold < 1:
            raise ConfigError("must be between 0 and 1", key="signals.anomaly.threshold")
        values["threshold"] = threshold
    for name in ("warmup", "learning_routes", "max_identities", "max_routes"):
        if name in value:
            number = value[name]
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise ConfigError("expected a whole number >= 0", key=f"signals.anomaly.{name}")
            values[name] = number
    return AnomalySettings(**values)


def _threat_lists(value: Any, base_dir: str | None, resolve_path: Any) -> tuple[ThreatSource, ...]:
    if not isinstance(value, list):
        raise ConfigError("expected a list of {name, path | url}", key="signals.threat_lists")
    sources = []
    for index, item in enumerate(value):
        key = f"signals.threat_lists[{index}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ConfigError("expected {name, path | url}", key=key)
        _only(item, {"name", "path", "url", "refresh"}, f"{key}.")
        if ("path" in item) == ("url" in item):
            raise ConfigError("give exactly one of path or url", key=key)
        refresh = 60.0
        if "refresh" in item:
            try:
                refresh = parse_duration(item["refresh"])
            except ValueError as exc:
                raise ConfigError(str(exc), key=f"{key}.refresh") from None
        if "url" in item and not str(item["url"]).startswith(("https://", "http://")):
            raise ConfigError("expected an http(s) URL", key=f"{key}.url")
        sources.append(ThreatSource(item["name"], path=resolve_path(str(item["path"]), base_dir) if "path" in item
                                    else "", url=str(item.get("url", "")), refresh=refresh))
    return tuple(sources)


@dataclass
class SignalStats:
    throttled: int = 0
    anomalous: int = 0
    threat_hits: int = 0
    credential_stuffing: int = 0


class Signals:
    """Implements the pipeline's ``SignalSource``."""

    def __init__(self, config: SignalsConfig) -> None:
        self.config = config
        self.limiter: RateLimiter | None = None
        if config.per_identity or config.per_route:
            self.limiter = (MemoryRateLimiter() if config.rate_store == "memory"
                            else RedisRateLimiter(config.rate_store))
        self.anomaly = (AnomalyDetector(config.anomaly, shared=config.anomaly_store != "memory")
                        if config.anomaly is not None else None)
        self.baselines: SharedBaselines | None = None
        if self.anomaly is not None and config.anomaly_store != "memory":
            self.baselines = SharedBaselines(self.anomaly, config.anomaly_store, interval=config.anomaly_sync_interval)
        # The anomaly detector tracks the same decaying rate; without it, this does.
        self.observed = ObservedRate() if self.anomaly is None else None
        self.threats = ThreatIntel(config.threat_lists)
        self.routes = RouteNormalizer()
        self.stats = SignalStats()
        self.failures = MemoryRateLimiter() if config.auth_failures is not None else None
        self._blocked: dict[str, float] = {}  # source -> until when it is refused
        self._unlimited = {"rate": 0.0, "limit": None, "remaining": None, "limited": False, "retry_after": 0}

    @staticmethod
    def identity_key(facts: Any, identity: Any) -> str:
        document = identity.document
        user = document.get("user") if document else None
        if user:
            return f"user:{user.get('iss', '')}|{user.get('sub', '')}"
        workload = document.get("workload") if document else None
        if workload:
            return f"workload:{workload['spiffe_id']}"
        return f"ip:{facts.source_address}" if facts.source_address else "anonymous"

    async def assess(self, facts: Any, identity: Any, now: float) -> dict[str, Any]:
        key = self.identity_key(facts, identity)
        route = self.routes(facts.path)
        method = facts.method
        rate: dict[str, Any]
        anomaly: dict[str, Any] = {"score": 0.0, "level": "normal"}
        if self.anomaly is not None:
            anomaly, observed = self.anomaly.observe_request(key, method, route, now)
            if anomaly["level"] == "anomalous":
                self.stats.anomalous += 1
        else:
            assert self.observed is not None
            observed = self.observed.observe(key, now)
        limiter = self.limiter
        if limiter is not None:
            config = self.config
            buckets = []
            if config.per_identity is not None:
                buckets.append((f"id|{key}", config.per_identity))
            if config.per_route is not None:
                buckets.append((f"rt|{key}|{method} {route}", config.per_route))
            result = (limiter.take_now(buckets, now) if isinstance(limiter, MemoryRateLimiter)
                      else await limiter.take(buckets, now, key))
            spec = config.per_identity or config.per_route
            assert spec is not None
            rate = {"rate": round(observed, 2), "limit": spec.rate, "remaining": int(result.remaining),
                    "limited": result.limited, "retry_after": int(result.retry_after + 0.999) if result.limited else 0}
            if result.limited:
                self.stats.throttled += 1
        else:
            rate = {**self._unlimited, "rate": round(observed, 2)}
        document = identity.document or {}
        user = document.get("user") or {}
        workload = document.get("workload") or {}
        threat = self.threats.lookup(ip=facts.source_address, spiffe_id=workload.get("spiffe_id", ""),
                                     subject=user.get("sub", ""), jti=(user.get("claims") or {}).get("jti", ""))
        if threat["listed"]:
            self.stats.threat_hits += 1
        return {"rate": rate, "anomaly": anomaly, "threat": threat,
                "sensitivity": sensitivity_of(facts.context_extensions, self.config.default_sensitivity)}

    @staticmethod
    def _source(facts: Any) -> str:
        return facts.source_principal or facts.source_address or "unknown"

    def gate(self, facts: Any, now: float) -> None:
        """Refuse a source that spent its budget of failed sign-ins (``credential_stuffing``,
        429), before its credentials are even looked at."""
        if not self._blocked:
            return
        until = self._blocked.get(self._source(facts))
        if until is None:
            return
        if until <= now:
            del self._blocked[self._source(facts)]
            return
        self.stats.credential_stuffing += 1
        error = IdentityError(f"{self._source(facts)} failed to authenticate too often; retry in "
                              f"{until - now:.0f}s", code="credential_stuffing")
        error.status = 429
        raise error

    async def record_identity_failure(self, facts: Any, now: float) -> None:
        if self.failures is None or self.config.auth_failures is None:
            return
        spec = self.config.auth_failures
        source = self._source(facts)
        result = await self.failures.take([(source, spec)], now)
        if result.limited:
            if len(self._blocked) >= 100_000:
                self._blocked.clear()
            self._blocked[source] = now + max(result.retry_after, 1.0 / spec.rate)

    def record_outcome(self, facts: Any, identity: Any, decision: Any, now: float) -> None:
        if self.anomaly is not None and facts is not None:
            self.anomaly.record_outcome(self.identity_key(facts, identity), not decision.allowed)

    async def watch(self) -> None:
        if self.baselines is None:
            await self.threats.watch()
        else:
            await asyncio.gather(self.threats.watch(), self.baselines.run())

    async def close(self) -> None:
        if self.limiter is not None:
            await self.limiter.close()
        if self.baselines is not None:
            await self.baselines.close()


__all__ = ["Signals", "SignalsConfig", "SignalStats"]
