"""The policy the server decides with, and its hot reload that keeps the last good set.

``PolicyRuntime.active`` is swapped atomically (one attribute assignment) and only to a set
that loaded, compiled and passed its own tests (the gate), with its evaluators' engines
already loaded. A folder that vanishes, a file that fails to parse, a failing test, a gate
that runs past ``GATE_TIMEOUT``: each is logged, counted and shown in ``status()``, and the
previous set keeps answering. The first load is stricter: without a good set there is
nothing to serve, so it raises and ``serve`` stops with that one line.

The gate runs on a thread of this process: OPA reports a panic as an error, so the separate
process regopy needed (it could abort) is gone. An evaluation cannot be cancelled, so a gate
past its timeout is rejected and its thread left to finish; what it built is then dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..decisioncache import policy_key_prefix
from ..errors import PolicyError
from ..facts import VOLATILE_ATTRIBUTES
from ..trees import Tree, leaf_paths, named_within, overlaps, subtract
from .engine import CompiledPolicy, Traced, reserve_processors, validate_query
from .inputs import input_paths
from .pool import EvaluatorPool
from .source import CacheSettings, PolicySet, load_policy_set, snapshot
from .testing import RequestReader, check_tests

INLINE_POLL_SECONDS = 0.002
GATE_TIMEOUT = 60.0
RETIRE_AFTER = 30.0  # seconds a replaced set's evaluators stay for requests already on their way

log = logging.getLogger("authz_server.policy")


def default_pool_size(cores: int | None = None) -> int:
    """Evaluation threads for a process given ``cores`` (default: the cores it may use): one
    core is the event loop's (it turns every request into an input and an answer), the others
    evaluate. Queued evaluations are batched, so one thread keeps up with one loop on light
    policies; every extra thread is another Go processor and splits the batches. Measured on 2
    cores through Envoy, route table, traffic that does not repeat (6 interleaved rounds, one
    process): 1 thread 679-903 µs of CPU a request against 928-1,158 with 2, more requests a
    second and a lower p99 in 5 rounds of 6."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


@dataclass
class ActivePolicy:
    policy_set: PolicySet
    query: str
    pool: EvaluatorPool
    loaded_at: float
    key_prefix: bytes = b""
    reads_clock: bool = False
    input_tree: Tree | None = None  # the parts of input the policy reads (None: all of it)
    signal_paths: tuple[tuple[str, ...], ...] | None = None  # the signal fields it reads (None: all)
    volatile_tree: Tree | None = None  # the per-request attributes it names (request id, port...), if any
    # per-request attributes it reads only as part of a larger subtree (`http := input...http`):
    # left out of its cache key, as they would make every request a miss
    unnamed_volatile: Tree | None = None

    def __post_init__(self) -> None:
        self.key_prefix = policy_key_prefix(self.version, self.query)
        self.reads_clock = self.policy_set.reads_clock
        self.input_tree = input_paths(self.policy_set.serving_modules)
        signals = None if self.input_tree is None else self.input_tree.get("signals", {})
        self.signal_paths = None if signals is None or signals is True else tuple(leaf_paths(signals))
        attributes = self.input_tree.get("attributes") if self.input_tree is not None else None
        if isinstance(attributes, dict):
            self.volatile_tree = named_within(attributes, VOLATILE_ATTRIBUTES) or None
            if overlaps(attributes, VOLATILE_ATTRIBUTES):
                self.unnamed_volatile = subtract(VOLATILE_ATTRIBUTES, self.volatile_tree or {}) or None

    @property
    def version(self) -> str:
        return self.policy_set.version

    @property
    def cache(self) -> CacheSettings:
        return self.policy_set.cache

    async def evaluate(self, input_json: bytes, *, timeout: float) -> Any:
        """The query's value for this input (``build_input(..., self.input_tree)``, encoded)."""
        return await self.pool.evaluate(input_json, timeout=timeout)

    async def explain(self, input_json: bytes, *, timeout: float) -> Traced:
        """``evaluate`` with OPA's trace recorded (explained decisions: see ``explaining``)."""
        traced: Traced = await self.pool.evaluate(input_json, timeout=timeout, traced=True)
        return traced


@dataclass
class ReloadStatus:
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_error: str = ""
    last_error_code: str = ""
    last_attempt: float = 0.0
    timeouts: int = 0  # evaluations stopped at their deadline, over every set served

    @property
    def current(self) -> bool:
        """True when what is on disk is what is serving (the last attempt succeeded)."""
        return not self.last_error


@dataclass
class PolicyRuntime:
    root: str
    query: str = "data.envoy.authz.allow"
    pool_size: int = field(default_factory=default_pool_size)  # evaluation threads
    isolation: str = "thread"  # see policy.pool
    strict: bool = False  # strict_builtin_errors
    run_tests: bool = True
    read_request: RequestReader | None = None  # for the set's tests given as Envoy requests (see policy.testing)
    active: ActivePolicy | None = None
    status: ReloadStatus = field(default_factory=ReloadStatus)
    listeners: list[Callable[["PolicyRuntime"], None]] = field(default_factory=list)
    data_overlay: dict[str, Any] = field(default_factory=dict)  # runtime data: path -> value
    _snapshot: tuple[Any, ...] = ()
    _files: PolicySet | None = None  # the last good set as read from disk, before the overlay
    _swap: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        validate_query(self.query)
        reserve_processors(self.pool_size)

    # -- loading
    def load(self) -> ActivePolicy:
        """Blocking first load (start-up); raises ``PolicyError`` if there is no good set. The
        caller reports it (``serve`` stops with that line), so it is counted, not logged."""
        self._snapshot = snapshot(self.root)
        try:
            files = load_policy_set(self.root)
            candidate = self._prepare(files.with_overlay(self.data_overlay))
        except PolicyError as exc:
            self._failed(exc, logged=False)
            raise
        self._files = files
        self._activate(candidate)
        assert self.active is not None
        return self.active

    async def reload(self) -> bool:
        """Load the folder again; True when a new set is now serving."""
        self._snapshot = await asyncio.to_thread(snapshot, self.root)
        async with self._lock():
            try:
                files = await asyncio.to_thread(load_policy_set, self.root)
                policy_set = files.with_overlay(self.data_overlay)
                if self.active is not None and policy_set.version == self.active.version:
                    self.status.last_error = self.status.last_error_code = ""
                    return False
                candidate = await self._prepare_async(policy_set)
            except PolicyError as exc:
                self._failed(exc)
                return False
            self._files = files
            self._activate(candidate)
        return True

    async def offer(self, policy_set: PolicySet, *, origin: str) -> bool:
        """Serve a set from another source (bundles, a promoted shadow) once it passes the gate
        a folder reload passes (compile and the set's own tests); True when it serves now,
        False when refused (the last good set keeps serving; ``status`` says why)."""
        async with self._lock():
            candidate_set = policy_set.with_overlay(self.data_overlay)
            if self.active is not None and candidate_set.version == self.active.version:
                return True
            try:
                candidate = await self._prepare_async(candidate_set)
            except PolicyError as exc:
                self._failed(exc, origin=origin)
                return False
            self._files = policy_set
            self._activate(candidate, origin)
        return True

    async def set_data(self, path: str, value: Any | None) -> str:
        """Put (or, with None, remove) runtime data at ``path`` without touching the Rego
        files; the new set is checked like any other and only then serves. Returns its
        version; raises ``PolicyError`` (the previous set keeps serving)."""
        key = "/".join(p for p in path.strip().split("/") if p)
        if not key or any(not part.replace("_", "").replace("-", "").isalnum() for part in key.split("/")):
            raise PolicyError(f"data path {path!r} must be segments of letters, digits, _ and -",
                              code="policy_data_invalid")
        async with self._lock():
            if self._files is None:
                raise PolicyError("no policy set is loaded yet", code="policy_not_loaded")
            overlay = dict(self.data_overlay)
            if value is None:
                overlay.pop(key, None)
            else:
                overlay[key] = value
            try:
                candidate = await self._prepare_async(self._files.with_overlay(overlay))
            except PolicyError as exc:
                self._failed(exc)
                raise
            self.data_overlay = overlay
            self._activate(candidate)
        return candidate.version

    async def watch(self, interval: float = 0.25) -> None:
        """Poll the folder and reload on change; runs until cancelled.

        A small folder is polled on the event loop: its stat calls cost less than handing
        the poll to a thread and back, which under load took about 2 % of the serving
        thread's time. A folder that takes longer than ``INLINE_POLL_SECONDS`` to poll is
        polled on a thread from then on, so that it never stalls the checks."""
        inline = True
        while True:
            await asyncio.sleep(interval)
            try:
                if inline:
                    started = time.perf_counter()
                    current = snapshot(self.root)
                    inline = time.perf_counter() - started < INLINE_POLL_SECONDS
                else:
                    current = await asyncio.to_thread(snapshot, self.root)
            except OSError:
                current = ()
            if current != self._snapshot:
                await self.reload()

    def _lock(self) -> asyncio.Lock:
        if self._swap is None:
            self._swap = asyncio.Lock()
        return self._swap

    def _prepare(self, policy_set: PolicySet) -> ActivePolicy:
        """The gate, then the engines: compile, run the set's own tests, load the evaluators."""
        compiled = CompiledPolicy.compile(policy_set, self.query, strict=self.strict)
        if self.run_tests:
            check_tests(policy_set, self.query, strict=self.strict, read_request=self.read_request)
        pool = EvaluatorPool(compiled, size=self.pool_size, on_timeout=self._count_timeout, isolation=self.isolation)
        return ActivePolicy(policy_set, self.query, pool, loaded_at=time.time())

    async def _prepare_async(self, policy_set: PolicySet) -> ActivePolicy:
        work = asyncio.ensure_future(asyncio.to_thread(self._prepare, policy_set))
        try:
            return await asyncio.wait_for(asyncio.shield(work), GATE_TIMEOUT)
        except TimeoutError:
            # The thread cannot be stopped; whatever it builds when it ends is thrown away.
            work.add_done_callback(_close_when_built)
            raise PolicyError(f"compiling and testing the policy set took longer than {GATE_TIMEOUT:.0f}s",
                              code="policy_timeout") from None

    def _activate(self, candidate: ActivePolicy, origin: str = "") -> None:
        previous = self.active
        self.active = candidate
        self.status.reloads_ok += 1
        self.status.last_error = self.status.last_error_code = ""
        self.status.last_attempt = time.time()
        policy_set = candidate.policy_set
        log.info("policy set %s loaded from %s (%d modules, %d data keys)", policy_set.version, origin or self.root,
                 len(policy_set.serving_modules), len(policy_set.data))
        if previous is not None:
            try:
                # A request that took the previous set just before the swap may still queue an
                # evaluation on its pool: the pool stays until that cannot happen any more.
                asyncio.get_running_loop().call_later(RETIRE_AFTER, previous.pool.close)
            except RuntimeError:
                previous.pool.close()
        self._notify()

    def _count_timeout(self) -> None:
        self.status.timeouts += 1

    def _failed(self, exc: PolicyError, *, logged: bool = True, origin: str = "") -> None:
        self.status.reloads_failed += 1
        self.status.last_error = exc.message
        self.status.last_error_code = exc.code
        self.status.last_attempt = time.time()
        if logged:
            serving = f"; still serving {self.active.version}" if self.active else "; no policy is serving"
            log.error("policy load from %s rejected (%s): %s%s", origin or self.root, exc.code, exc.message, serving)
        self._notify()

    def _notify(self) -> None:
        for listener in self.listeners:
            listener(self)

    def close(self) -> None:
        if self.active is not None:
            self.active.pool.close()


def _close_when_built(done: "asyncio.Future[ActivePolicy]") -> None:
    """A policy built after the gate gave up on it: its evaluators are closed, never served."""
    if done.exception() is None:
        done.result().pool.close()
