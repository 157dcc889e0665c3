"""Benchmark plumbing, shared with ``authz-server evaluate``: it lives in the installed package
(``authz_server/evaluate/load.py``) so the evaluation can use it outside a checkout; and the
benchmarks' own ways of judging a pair of set-ups on a noisy machine (``interleave``,
``median_interval``)."""

import math
from typing import Any, Callable

from authz_server.evaluate.load import (CLOCK_TICKS, PERCENTILES_LUA, LoadResult, Settings, bench_supervisor,
                                        cpu_seconds, load_with_cpu, rss_mb, run_wrk, save, start_authz_server,
                                        start_bare_authz, start_upstream, table, timed, wait_port, wrk_binary)

__all__ = ["CLOCK_TICKS", "PERCENTILES_LUA", "LoadResult", "Settings", "bench_supervisor", "cpu_seconds",
           "load_with_cpu", "rss_mb", "run_wrk", "save", "start_authz_server", "start_bare_authz", "start_upstream",
           "table", "timed", "wait_port", "wrk_binary", "interleave", "median_interval"]


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


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``values``: the order statistics
    the binomial distribution puts around it (no assumption that rounds' differences are normal:
    a round the Go collector or another process hit is an outlier, not a wider bell)."""
    ordered, n = sorted(values), len(values)
    tail, k = 0.0, 0  # the largest k with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2
    while k < n // 2 and tail + math.comb(n, k) / 2 ** n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2 ** n
        k += 1
    if k == 0:  # too few rounds for this confidence: the interval is everything seen
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]
