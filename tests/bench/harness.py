"""Benchmark plumbing, shared with ``authz-server evaluate``: it lives in the installed package
(``authz_server/evaluate/load.py``) so the evaluation can use it outside a checkout."""

from authz_server.evaluate.load import (CLOCK_TICKS, PERCENTILES_LUA, LoadResult, Settings, bench_supervisor,
                                        cpu_seconds, load_with_cpu, rss_mb, run_wrk, save, start_authz_server,
                                        start_bare_authz, start_upstream, table, timed, wait_port, wrk_binary)

__all__ = ["CLOCK_TICKS", "PERCENTILES_LUA", "LoadResult", "Settings", "bench_supervisor", "cpu_seconds",
           "load_with_cpu", "rss_mb", "run_wrk", "save", "start_authz_server", "start_bare_authz", "start_upstream",
           "table", "timed", "wait_port", "wrk_binary"]
