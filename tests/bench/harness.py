"""Benchmark plumbing, shared with ``authz-server evaluate``: it lives in the installed package
(``authz_server/evaluate/load.py``) so the evaluation can use it outside a checkout; and the
benchmarks' own way of judging a pair of set-ups on a noisy machine (``interleave``)."""

from typing import Any, Callable

from authz_server.evaluate.load import (CLOCK_TICKS, PERCENTILES_LUA, LoadResult, Settings, bench_supervisor,
                                        cpu_seconds, load_with_cpu, rss_mb, run_wrk, save, start_authz_server,
                                        start_bare_authz, start_upstream, table, timed, wait_port, wrk_binary)

__all__ = ["CLOCK_TICKS", "PERCENTILES_LUA", "LoadResult", "Settings", "bench_supervisor", "cpu_seconds",
           "load_with_cpu", "rss_mb", "run_wrk", "save", "start_authz_server", "start_bare_authz", "start_upstream",
           "table", "timed", "wait_port", "wrk_binary", "interleave"]


def interleave(results: dict[str, Any], rounds: list[float], reference_key: str, reference: Callable[[], LoadResult],
               key: str, mine: Callable[[], LoadResult], more: int) -> None:
    """``more`` rounds of ``reference`` then ``mine``, after the runs already in ``results``: each
    set-up keeps its best run there, and each round's own ratio (``mine`` ÷ ``reference``, the
    first from the runs already made) goes to ``rounds``. On a small VM req/s moves ±15 % from
    one run to the next, more than the gaps the targets judge."""
    rounds.append(results[key].rps / (results[reference_key].rps or 1))
    for _ in range(more):
        theirs, ours = reference(), mine()
        rounds.append(ours.rps / (theirs.rps or 1))
        results[reference_key] = max(results[reference_key], theirs, key=lambda r: r.rps)
        results[key] = max(results[key], ours, key=lambda r: r.rps)
