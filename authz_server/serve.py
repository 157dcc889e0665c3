"""``authz-server serve``: flags and config → one server process, or one per core.

With ``--workers N`` (N > 1) this process becomes a small supervisor: it reserves the
ports, starts N worker processes that bind them with ``SO_REUSEPORT`` (the kernel spreads
connections across them), restarts a worker that dies, aggregates their ``/metrics`` and
stops them all on SIGINT/SIGTERM. Each worker is an ordinary single server.

Draining (``shutdown`` in the config): SIGTERM or SIGINT turns every gRPC health status
NOT_SERVING at once (Envoy's active health checks and Kubernetes' readiness probe take the
replica out), keeps answering for what is left of ``drain_delay``, then stops taking new
checks, lets those in flight finish (up to ``grace``) and exits. SIGUSR1 starts the
draining without stopping (a ``preStop`` hook sends it); a second SIGTERM cuts the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import Config, check_query, load_config
from .configkeys import resolve_path
from .errors import AuthzError, ConfigError

log = logging.getLogger("authz_server.serve")


class _WorkerExplained(Exception):
    """A worker exited during start after saying why on the stderr it shares with us."""

    def __init__(self, returncode: int) -> None:
        super().__init__(returncode)
        self.returncode = returncode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (flags override its keys)")
    parser.add_argument("--addr", help="ext_authz gRPC address, host:port or unix:/path ('' turns gRPC off); "
                                       "default 127.0.0.1:9191")
    parser.add_argument("--http-addr", dest="http_addr",
                        help="also answer Envoy's HTTP ext_authz protocol here (host:port or unix:/path)")
    parser.add_argument("--policies", help="folder of .rego files and data.json/data.yaml; default policies/")
    parser.add_argument("--query", help="policy query; default data.envoy.authz.allow")
    parser.add_argument("--metrics-addr", dest="metrics_addr",
                        help="Prometheus /metrics address ('' turns it off); default 127.0.0.1:9464")
    parser.add_argument("--policy-threads", dest="policy_threads", type=int,
                        help="policy evaluation threads per process (one OPA engine each); default: a process's "
                             "share of the cores less one (its event loop's), at least 1")
    parser.add_argument("--workers", type=int, help="server processes sharing the ports (SO_REUSEPORT); "
                                                    "default: one per core")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true", default=None,
                        help="allow everything, record what would have been decided")
    parser.add_argument("--audit", action="append", help="decision log sink: stdout, file:PATH or a "
                                                         "postgresql:// URL (repeatable)")
    parser.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--ready-file", dest="ready_file",
                        help="write the bound addresses as JSON here once serving (for scripts and tests)")
    parser.add_argument("--worker-of", dest="worker_of", type=int, help=argparse.SUPPRESS)


def effective_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    overrides: dict[str, Any] = {}
    for name in ("addr", "http_addr", "query", "metrics_addr", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.policies is not None:
        overrides["policies"] = resolve_path(args.policies, None)
    if args.query is not None:
        check_query(args.query, "--query")
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError("must be at least 1", key="--workers")
        overrides["workers"] = args.workers
    if args.policy_threads is not None:
        if not 1 <= args.policy_threads <= 256:
            raise ConfigError("must be between 1 and 256", key="--policy-threads")
        overrides["policy_threads"] = args.policy_threads
    if args.audit:
        from .config import _audit_sinks

        overrides["audit"] = _audit_sinks(args.audit, None)
    config = config.with_overrides(**overrides)
    if args.policies is not None and config.control_plane is not None and config.control_plane.live_bundles:
        raise ConfigError("policies (a folder) and bundles may not both be set: serve one or the other",
                          key="--policies")
    if args.dry_run:
        from dataclasses import replace

        config = replace(config, decision=replace(config.decision, dry_run=True))
    for key in ("addr", "http_addr", "metrics_addr"):
        from .config import _address

        _address(getattr(config, key), f"--{key.replace('_', '-')}")
    if not config.addr and not config.http_addr:
        raise ConfigError("both --addr and --http-addr are empty: nothing would serve", key="addr")
    return config


def resolve_workers(config: Config) -> int:
    """``--workers`` if given; else one per core, except that sessions kept in process
    memory cannot be shared, so then one process (use a redis:// store to scale out), and
    a unix: address cannot be shared by several processes either."""
    if config.workers:
        return config.workers
    if config.addr.startswith("unix:") or config.http_addr.startswith("unix:"):
        log.info("one worker: a unix: address is served by one process (use host:port for more)")
        return 1
    if config.issuers and config.sessions.settings.enabled and config.sessions.store == "memory":
        log.info("one worker: sessions live in process memory (set sessions.store to redis:// for more)")
        return 1
    return _cores()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO (metric scrapes, JWKS fetches, bundle polls, log uploads):
    # noise a user cannot act on; their failures reach our own log as errors.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))


def run(args: argparse.Namespace) -> int:
    try:
        config = effective_config(args)
    except AuthzError as exc:
        print(f"authz-server: config error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    workers = resolve_workers(config)
    try:
        if workers == 1 or args.worker_of is not None:
            return _run_loop(_serve_one(config, args.ready_file, reuse_port=args.worker_of is not None))
        return _run_loop(_supervise(config, workers, args))
    except _WorkerExplained as exc:
        return exc.returncode
    except ConfigError as exc:
        print(f"authz-server: config error: {exc.message}", file=sys.stderr)
        return 2
    except AuthzError as exc:
        print(f"authz-server: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"authz-server: cannot start: {exc}", file=sys.stderr)
        return 2


def _run_loop(main: Any) -> int:
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _drain_event() -> asyncio.Event:
    drain = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, drain.set)
    return drain


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# The youngest generation is collected once this many more container objects live than at the
# last collection (CPython's default: 700), see ``settle_heap``.
YOUNG_GENERATION_THRESHOLD = 10_000


def settle_heap() -> None:
    """Take what starting made (modules, config, the first policy set: it lives as long as the
    process) out of the cyclic garbage collector's sight, after collecting start-up garbage;
    then collect the youngest generation less often (``YOUNG_GENERATION_THRESHOLD``).

    A full collection walks every tracked object and holds the event loop, and every check in
    flight, while it does: measured on the route-table benchmark's server heap, one full
    collection took 36–68 ms, the whole p99 at 32 connections. Frozen, a full collection walks
    only what traffic made since. Frozen objects are still freed by reference counting; only
    a reference cycle among them would stay, and start-up objects are not garbage.

    What traffic makes is mostly gone by reference counting within a request, but at CPython's
    700 a young collection came every 30 requests or so, and every object of the requests then
    in flight (and of decisions waiting for the audit log's next pass) that it found alive moved
    on to an older generation, until enough had to trigger a full collection: with the decision
    cache filling up (113,000 tracked objects) one took 90–140 ms. At 10,000 a young collection
    comes every few hundred requests, so a request's objects are rarely alive when one does.
    Measured in one server, gRPC traffic that does not repeat through Envoy, 32 connections, 12
    rounds a setting: the collector's CPU went from 18–22 µs a request to 6.5–8.2, with the audit
    log on and off, and the 5-second loads with a full collection in them from 36 of 48 to 3 of
    48. What it costs: reference cycles that became garbage (a few per request at most) wait for
    10,000 net new objects, a few megabytes, instead of 700."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


def write_ready_file(path: str | None, bound: dict[str, Any]) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps({**bound, "pid": os.getpid()}))
    os.replace(tmp, path)  # atomic: readers never see half a file


async def _serve_one(config: Config, ready_file: str | None, *, reuse_port: bool) -> int:
    from .server import build_app

    app = build_app(config, reuse_port=reuse_port)
    stop = _stop_event()
    try:
        bound = await app.start()
    except AuthzError:
        await app.stop(0)
        raise
    log.info("serving %s", ", ".join(f"{k}={v}" for k, v in bound.items()))
    settle_heap()
    write_ready_file(ready_file, bound)
    drain = _drain_event()
    await _first(stop, drain)
    drain_started = time.monotonic()
    await app.drain()
    if not stop.is_set():
        await stop.wait()  # drained on SIGUSR1: now answering until told to stop
    remaining = config.shutdown.drain_delay - (time.monotonic() - drain_started)
    if remaining > 0:
        log.info("draining: NOT_SERVING, still answering for %.1fs", remaining)
        stop.clear()
        try:
            await asyncio.wait_for(stop.wait(), remaining)  # a second signal cuts it short
        except asyncio.TimeoutError:
            pass
    log.info("shutting down: finishing the checks in flight (up to %gs)", config.shutdown.grace)
    await app.stop(config.shutdown.grace)
    return 0


# -- several processes

def _reserve(address: str) -> tuple[str, socket.socket | None]:
    """Bind (without listening) to learn a concrete port that every worker can share."""
    if not address or address.startswith("unix:"):
        return address, None
    host, _, port = address.rpartition(":")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), int(port)))
    return f"{host}:{sock.getsockname()[1]}", sock


async def _supervise(config: Config, workers: int, args: argparse.Namespace) -> int:
    from .http import serve_http
    from .metrics import aggregate_worker_metrics

    if config.addr.startswith("unix:") or config.http_addr.startswith("unix:"):
        raise ConfigError("several workers cannot share a unix: address; use host:port or --workers 1",
                          key="--workers")
    stop = _stop_event()
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGUSR1, lambda: [p.send_signal(signal.SIGUSR1) for p in procs.values() if p.returncode is None])
    addr, addr_sock = _reserve(config.addr)
    http_addr, http_sock = _reserve(config.http_addr)
    run_dir = tempfile.mkdtemp(prefix="authz-workers-")
    argv_tail = _worker_argv(args, addr, http_addr)
    if not config.policy_threads:
        from .policy.loader import default_pool_size

        # The cores are shared out: each worker evaluates on its part of them (and its Go
        # runtime keeps as many processors as it has evaluation threads: policy.engine).
        argv_tail += ["--policy-threads", str(default_pool_size(max(1, _cores() // workers)))]
    procs: dict[int, asyncio.subprocess.Process] = {}

    async def start_worker(index: int) -> None:
        metrics = f"unix:{run_dir}/metrics-{index}.sock"
        ready = f"{run_dir}/ready-{index}.json"
        Path(ready).unlink(missing_ok=True)
        procs[index] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authz_server.cli", "serve", *argv_tail, "--metrics-addr", metrics,
            "--ready-file", ready, "--worker-of", str(os.getpid()))
        while not Path(ready).exists():
            code = procs[index].returncode
            if code is not None:
                if code > 0:
                    raise _WorkerExplained(code)
                raise AuthzError(f"worker {index} exited with code {code} during start", code="worker_failed")
            await asyncio.sleep(0.05)

    try:
        # The first worker starts alone: a setting that keeps every worker from starting is
        # then reported once, by that worker, instead of once per worker.
        await start_worker(0)
        await asyncio.gather(*(start_worker(i) for i in range(1, workers)))
        metrics_server = None
        bound = {"addr": addr, "http_addr": http_addr, "workers": workers}
        if config.metrics_addr:
            sockets = [f"{run_dir}/metrics-{i}.sock" for i in range(workers)]
            metrics_server, bound["metrics_addr"] = await serve_http(
                lambda req: aggregate_worker_metrics(req, sockets), config.metrics_addr)
        log.info("serving with %d workers: %s", workers, bound)
        write_ready_file(args.ready_file, bound)
        while not stop.is_set():
            waiters = {asyncio.create_task(p.wait()): i for i, p in procs.items()}
            stopper = asyncio.create_task(stop.wait())
            done, pending = await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if stop.is_set():
                break
            for task in done:
                if task in waiters:
                    index = waiters[task]
                    log.error("worker %d exited with code %s; restarting it", index, procs[index].returncode)
                    await asyncio.sleep(0.5)  # do not spin if it dies at once every time
                    await start_worker(index)
        if metrics_server is not None:
            metrics_server.close()
        return 0
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:  # each worker drains: its delay, then its checks in flight
                await asyncio.wait_for(proc.wait(), config.shutdown.drain_delay + config.shutdown.grace + 5)
            except TimeoutError:
                proc.kill()
        for sock in (addr_sock, http_sock):
            if sock is not None:
                sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _worker_argv(args: argparse.Namespace, addr: str, http_addr: str) -> list[str]:
    argv: list[str] = []
    if args.config:
        argv += ["--config", args.config]
    argv += ["--addr", addr, "--http-addr", http_addr, "--workers", "1"]
    for name in ("policies", "query", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", value]
    if args.dry_run:
        argv.append("--dry-run")
    for sink in args.audit or ():
        argv += ["--audit", sink]
    return argv
