"""``authz-server identity serve --config FILE``: the dev SPIFFE issuer. DEVELOPMENT ONLY.

Prints one line per socket, then ``identity: ready``. SIGTERM/SIGINT stop it cleanly (sockets
and the ready file removed); SIGUSR1 re-issues every X.509-SVID now; SIGUSR2 publishes a new
CA for every trust domain (each signs ``ca_publish_ahead`` later).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any, Callable, Coroutine

from ..errors import ConfigError
from .config import IdentityConfig
from .server import IdentityServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="identity_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve the Workload API and SDS on a socket per workload (development only)",
                           description="Serve X.509/JWT-SVIDs over the SPIFFE Workload API and Envoy SDS, one Unix "
                                       "socket per workload. SIGUSR1: rotate every SVID now; SIGUSR2: rotate CAs.")
    serve.add_argument("--config", required=True, metavar="FILE",
                       help="YAML: state_dir, svid_ttl, trust_domains, workloads (see docs/workload.md)")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = IdentityConfig.from_yaml(args.config)
    except ConfigError as exc:
        print(f"config error: {exc.message}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config))


async def _serve(config: IdentityConfig) -> int:
    stop = asyncio.Event()
    server = IdentityServer(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start()
    except ConfigError as exc:
        print(f"config error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"identity: cannot start: {exc}", file=sys.stderr)
        return 1
    async def rotate_cas() -> None:
        for domain in config.trust_domains:
            await server.rotate_ca(domain.name)

    pending: set[asyncio.Task[object]] = set()

    def spawn(make: Callable[[], Coroutine[Any, Any, object]]) -> None:
        task = asyncio.create_task(make())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGUSR1, spawn, server.rotate_now)
    loop.add_signal_handler(signal.SIGUSR2, spawn, rotate_cas)
    for workload in config.workloads:
        print(f"identity: {workload.name} {workload.spiffe_id} on unix:{workload.socket}", flush=True)
    if server.bundle_endpoint_address:
        print(f"identity: bundle endpoint https://{server.bundle_endpoint_address}/<trust domain>", flush=True)
    for partner in config.remote_partners:
        print(f"identity: federated with {partner.trust_domain} from {partner.bundle_endpoint_url}", flush=True)
    print(f"identity: ready (DEVELOPMENT ONLY issuer; {len(config.workloads)} sockets, "
          f"svid_ttl {config.svid_ttl:g}s, state in {config.state_dir})", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    print("identity: stopped", flush=True)
    return 0
