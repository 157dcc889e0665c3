"""Policy evaluations on worker threads, each with its own engine, answered by a deadline.

The OPA engine releases the GIL while it evaluates, so threads are how one process puts more
than one core to policy work; and an engine serializes its own calls, so each thread owns an
``Evaluator``. The event loop only queues a job and, later, receives its answer.

Under load the queue holds several jobs when a worker comes back to it: it takes up to
``MAX_BATCH`` of them and evaluates them in one engine call (``Evaluator.evaluate_many``: the
call's fixed cost, the thread hand-off and the data the policy reads are paid once for the batch)
and answers them with one wake-up of the event loop. One at a time, a job is evaluated alone,
as before. A batch whose call fails is evaluated job by job, so each error stays with its job.

An evaluation cannot be cancelled. When one overruns the deadline, the request is denied at
the deadline (``policy_timeout``), the worker evaluating it is marked stuck and a replacement
starts (at most ``spare`` at a time), so the rest of the traffic keeps ``size`` workers and is
decided on time; the stuck worker exits when its evaluation finally returns. A job whose
deadline passed while it waited is dropped unevaluated. When a job of a batch overruns, the
rest of its batch is queued again for the other workers. With every spare used, new work waits
for the live workers and denies at its deadline: bounded threads, never an accidental allow.
Nothing is evaluated on the event loop unless ``isolation`` is ``inline`` (tools, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

from ..errors import PolicyError
from .engine import CompiledPolicy, Evaluator

log = logging.getLogger("authz_server.policy")

ISOLATION_MODES = ("thread", "inline")
MAX_BATCH = 16  # jobs per engine call: past ~16 the per-decision cost stops falling (measured: 4 -> 146 µs, 16 -> 108, 32 -> 105)


class _Job:
    __slots__ = ("input_json", "future", "loop", "deadline", "started", "abandoned", "timer", "traced")

    def __init__(self, input_json: bytes, future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop,
                 deadline: float, traced: bool = False) -> None:
        self.input_json = input_json
        self.traced = traced  # evaluate_traced: the answer is an engine.Traced
        self.future = future
        self.loop = loop
        self.deadline = deadline
        self.started = False
        self.abandoned = False
        self.timer: asyncio.TimerHandle | None = None


class _Worker:
    __slots__ = ("evaluator", "jobs", "retire")

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator
        self.jobs: tuple[_Job, ...] = ()  # being evaluated
        self.retire = False  # replaced while stuck: exits once its evaluation returns


_STOP: Any = object()


class EvaluatorPool:
    """See the module docstring. ``evaluate`` is called on the event loop."""

    def __init__(self, compiled: CompiledPolicy, *, size: int = 2, spare: int = 8,
                 on_timeout: Callable[[], None] | None = None, isolation: str = "thread") -> None:
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        self.compiled = compiled
        self.isolation = isolation
        self.size = max(1, size)
        self._spare = spare
        self._on_timeout = on_timeout
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._direct: Evaluator | None = None  # evaluate_now and inline: the caller's thread
        self._direct_lock = threading.Lock()
        if isolation == "thread":
            # Engines are loaded here (a reload's thread), so the first request after a swap
            # never waits for a policy or its data to load.
            for evaluator in [compiled.new_evaluator() for _ in range(self.size)]:
                self._start(evaluator)

    # -- the event loop's side

    async def evaluate(self, input_json: bytes, *, timeout: float, traced: bool = False) -> Any:
        """The query's value; with ``traced``, an ``engine.Traced`` (the value and OPA's trace)."""
        if self.isolation == "inline":
            return self.evaluate_now(input_json, traced=traced)
        loop = asyncio.get_running_loop()
        job = _Job(input_json, loop.create_future(), loop, time.monotonic() + timeout, traced)
        job.timer = loop.call_later(timeout, self._expire, job, timeout)
        self._queue.put(job)
        try:
            return await job.future
        finally:
            job.timer.cancel()

    def _expire(self, job: _Job, timeout: float) -> None:
        if job.future.done():
            return
        job.abandoned = True
        if self._on_timeout is not None:
            self._on_timeout()
        if job.started:
            self._replace_stuck(job)
            message = f"policy evaluation exceeded {timeout:.3f}s"
        else:
            message = f"no policy evaluator free within {timeout:.3f}s"
        job.future.set_exception(PolicyError(message, code="policy_timeout"))

    def _replace_stuck(self, job: _Job) -> None:
        with self._lock:
            worker = next((w for w in self._workers if job in w.jobs and not w.retire), None)
            if worker is None or self._closed:
                return
            # Its batchmates are not the ones stuck: queued again, another worker answers them
            # (if the stuck one ever returns, its late answers find them answered already).
            for mate in worker.jobs:
                if mate is not job and not mate.abandoned:
                    mate.started = False
                    self._queue.put(mate)
            worker.jobs = (job,)
            retiring = sum(w.retire for w in self._workers)
            if retiring >= self._spare:
                log.error("%d policy evaluations are stuck past their deadline and no spare worker is left: "
                          "new evaluations wait for the %d others", retiring + 1, len(self._workers) - retiring - 1)
                return
            worker.retire = True
        threading.Thread(target=self._replace, name="rego-replace", daemon=True).start()

    def _replace(self) -> None:
        try:
            evaluator = self.compiled.new_evaluator()
        except PolicyError as exc:  # it compiled before; a failure here is the machine's
            log.error("could not start a replacement policy evaluator: %s", exc.message)
            return
        self._start(evaluator)

    # -- the workers' side

    def _start(self, evaluator: Evaluator) -> None:
        worker = _Worker(evaluator)
        with self._lock:
            if self._closed:
                evaluator.close()
                return
            self._workers.append(worker)
        threading.Thread(target=self._work, args=(worker,), name="rego", daemon=True).start()

    def _work(self, worker: _Worker) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch, after, stop = self._gather(first)
                self._run(worker, batch)
                if after:
                    self._run(worker, after)
                if stop or worker.retire:
                    return  # told to stop, or replaced while it was stuck: the pool has its workers
        finally:
            with self._lock:
                if worker in self._workers:
                    self._workers.remove(worker)
            worker.evaluator.close()

    def _gather(self, first: _Job) -> tuple[list[_Job], list[_Job], bool]:
        """``first`` and the plain jobs queued behind it (up to ``MAX_BATCH``); a traced job met
        on the way is run on its own after them; whether a stop was met."""
        batch: list[_Job] = [first]
        after: list[_Job] = []
        if first.traced:
            return [], batch, False
        waiting = self._queue
        while len(batch) < MAX_BATCH and not waiting.empty():  # one at a time: no queue.Empty raised
            try:
                job = waiting.get_nowait()
            except queue.Empty:  # another worker took it
                break
            if job is _STOP:
                return batch, after, True
            if job.traced:
                after.append(job)
                break
            batch.append(job)
        return batch, after, False

    def _run(self, worker: _Worker, jobs: list[_Job]) -> None:
        now = time.monotonic()
        live = tuple(job for job in jobs if not job.abandoned and now < job.deadline)  # others denied already
        if not live:
            return
        worker.jobs = live
        for job in live:
            job.started = True
        answers = self._evaluate(worker.evaluator, live)
        worker.jobs = ()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, bool]]] = {}
        for job, (result, failed) in zip(live, answers):
            if not job.abandoned and not job.future.done():  # done: answered by another worker
                by_loop.setdefault(job.loop, []).append((job.future, result, failed))
        for loop, delivered in by_loop.items():  # one wake-up per loop for the whole batch
            try:
                loop.call_soon_threadsafe(_deliver_all, delivered)
            except RuntimeError:  # that loop is closed: nobody waits for these answers any more
                pass

    @staticmethod
    def _evaluate(evaluator: Evaluator, jobs: tuple[_Job, ...]) -> list[tuple[Any, bool]]:
        """(result, failed) per job: a batch in one call when it can, else one by one."""
        if len(jobs) > 1:
            try:
                values = evaluator.evaluate_many([job.input_json for job in jobs])
            except Exception:  # whatever it was, each job on its own says it for itself
                values = None
            if values is not None:
                return [(value, False) for value in values]
        answers: list[tuple[Any, bool]] = []
        for job in jobs:
            try:
                answers.append((evaluator.evaluate_traced(job.input_json) if job.traced
                                else evaluator.evaluate(job.input_json), False))
            except BaseException as exc:  # delivered to the request, which denies
                answers.append((exc, True))
        return answers

    # -- tools, tests, inline mode

    def evaluate_now(self, input_json: bytes, *, traced: bool = False) -> Any:
        """Synchronous evaluation on the caller's thread (no deadline)."""
        with self._direct_lock:
            if self._direct is None:
                self._direct = self.compiled.new_evaluator()
            return self._direct.evaluate_traced(input_json) if traced else self._direct.evaluate(input_json)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"workers": len(self._workers), "stuck": sum(w.retire for w in self._workers)}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            count = len(self._workers)
        for _ in range(count):
            self._queue.put(_STOP)
        with self._direct_lock:
            if self._direct is not None:
                self._direct.close()
                self._direct = None


def _deliver_all(answers: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, result, failed in answers:
        if future.done():
            continue
        if failed:
            future.set_exception(result)
        else:
            future.set_result(result)
