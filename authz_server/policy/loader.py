"""The policy the server decides with, and its hot reload that keeps the last good set.

``PolicyRuntime.active`` is swapped atomically (one attribute assignment) and only to a set
that loaded, compiled and passed its own tests in a preflight process. A folder that
vanishes, a file that fails to parse, a failing test: each is logged, counted and shown in
``status()``, and the previous set keeps answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PolicyError
from ..facts import VOLATILE_ATTRIBUTES
from .engine import CompiledPolicy, EvaluatorPool, validate_query
from .inputs import Tree, input_paths, leaf_paths, named_within
from .preflight import preflight, preflight_async
from .source import CacheSettings, PolicySet, load_policy_set, snapshot

INLINE_POLL_SECONDS = 0.002

log = logging.getLogger("authz_server.policy")


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

    def __post_init__(self) -> None:
        self.key_prefix = hashlib.blake2b(f"{self.version}\0{self.query}".encode(), digest_size=16).digest()
        self.reads_clock = self.policy_set.reads_clock
        self.input_tree = input_paths(self.policy_set.serving_modules)
        signals = None if self.input_tree is None else self.input_tree.get("signals", {})
        self.signal_paths = None if signals is None or signals is True else tuple(leaf_paths(signals))
        attributes = self.input_tree.get("attributes") if self.input_tree is not None else None
        if isinstance(attributes, dict):
            self.volatile_tree = named_within(attributes, VOLATILE_ATTRIBUTES) or None

    @property
    def version(self) -> str:
        return self.policy_set.version

    @property
    def cache(self) -> CacheSettings:
        return self.policy_set.cache

    async def evaluate(self, document: Any, *, timeout: float) -> Any:
        """``document`` built for this policy: ``build_input(..., self.input_tree)``."""
        return await self.pool.evaluate(document, timeout=timeout)


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
    pool_size: int = 2
    isolation: str = "adaptive"  # see EvaluatorPool
    run_tests: bool = True
    active: ActivePolicy | None = None
    status: ReloadStatus = field(default_factory=ReloadStatus)
    listeners: list[Callable[["PolicyRuntime"], None]] = field(default_factory=list)
    data_overlay: dict[str, Any] = field(default_factory=dict)  # runtime data: path -> value
    _snapshot: tuple[Any, ...] = ()
    _files: PolicySet | None = None  # the last good set as read from disk, before the overlay

    def __post_init__(self) -> None:
        validate_query(self.query)

    # -- loading
    def load(self) -> ActivePolicy:
        """Blocking first load (start-up); raises ``PolicyError`` if there is no good set."""
        self._snapshot = snapshot(self.root)
        try:
            files = load_policy_set(self.root)
            policy_set = files.with_overlay(self.data_overlay)
            preflight(policy_set, self.query, run_tests=self.run_tests)
            self._files = files
            self._activate(policy_set)
        except PolicyError as exc:
            self._failed(exc)
            raise
        assert self.active is not None
        return self.active

    async def reload(self) -> bool:
        """Load the folder again; True when a new set is now serving."""
        self._snapshot = await asyncio.to_thread(snapshot, self.root)
        try:
            files = await asyncio.to_thread(load_policy_set, self.root)
            policy_set = files.with_overlay(self.data_overlay)
            if self.active is not None and policy_set.version == self.active.version:
                self.status.last_error = self.status.last_error_code = ""
                return False
            await preflight_async(policy_set, self.query, run_tests=self.run_tests)
            self._files = files
            await asyncio.to_thread(self._activate, policy_set)
        except PolicyError as exc:
            self._failed(exc)
            return False
        return True

    async def offer(self, policy_set: PolicySet, *, origin: str) -> bool:
        """Serve a set from another source (bundles, a promoted shadow) once it passes the gate
        a folder reload passes (compile and the set's own tests, in preflight); True when it
        serves now, False when refused (the last good set keeps serving; ``status`` says why)."""
        candidate = policy_set.with_overlay(self.data_overlay)
        if self.active is not None and candidate.version == self.active.version:
            return True
        try:
            await preflight_async(candidate, self.query, run_tests=self.run_tests)
        except PolicyError as exc:
            self._failed(exc, origin=origin)
            return False
        self._files = policy_set
        await asyncio.to_thread(self._activate, candidate, origin)
        return True

    async def set_data(self, path: str, value: Any | None) -> str:
        """Put (or, with None, remove) runtime data at ``path`` without touching the Rego
        files; the new set is checked like any other and only then serves. Returns its
        version; raises ``PolicyError`` (the previous set keeps serving)."""
        key = "/".join(p for p in path.strip().split("/") if p)
        if not key or any(not part.replace("_", "").replace("-", "").isalnum() for part in key.split("/")):
            raise PolicyError(f"data path {path!r} must be segments of letters, digits, _ and -",
                              code="policy_data_invalid")
        if self._files is None:
            raise PolicyError("no policy set is loaded yet", code="policy_not_loaded")
        overlay = dict(self.data_overlay)
        if value is None:
            overlay.pop(key, None)
        else:
            overlay[key] = value
        candidate = self._files.with_overlay(overlay)
        try:
            await preflight_async(candidate, self.query, run_tests=self.run_tests)
        except PolicyError as exc:
            self._failed(exc)
            raise
        self.data_overlay = overlay
        await asyncio.to_thread(self._activate, candidate)
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

    def _activate(self, policy_set: PolicySet, origin: str = "") -> None:
        compiled = CompiledPolicy(policy_set, self.query)
        pool = EvaluatorPool(compiled, size=self.pool_size, on_timeout=self._count_timeout, isolation=self.isolation)
        previous = self.active
        self.active = ActivePolicy(policy_set, self.query, pool, loaded_at=time.time())
        self.status.reloads_ok += 1
        self.status.last_error = self.status.last_error_code = ""
        self.status.last_attempt = time.time()
        log.info("policy set %s loaded from %s (%d modules, %d data keys)", policy_set.version, origin or self.root,
                 len(policy_set.serving_modules), len(policy_set.data))
        if previous is not None:
            previous.pool.close()
        self._notify()

    def _count_timeout(self) -> None:
        self.status.timeouts += 1

    def _failed(self, exc: PolicyError, origin: str = "") -> None:
        self.status.reloads_failed += 1
        self.status.last_error = exc.message
        self.status.last_error_code = exc.code
        self.status.last_attempt = time.time()
        serving = f"; still serving {self.active.version}" if self.active else "; no policy is serving"
        log.error("policy load from %s rejected (%s): %s%s", origin or self.root, exc.code, exc.message, serving)
        self._notify()

    def _notify(self) -> None:
        for listener in self.listeners:
            listener(self)

    def close(self) -> None:
        if self.active is not None:
            self.active.pool.close()
