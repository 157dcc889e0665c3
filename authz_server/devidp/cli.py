"""``authz-server devidp serve --config FILE``: run the dev OIDC provider. DEVELOPMENT ONLY."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ..errors import ConfigError
from .config import load_devidp_config
from .provider import DevIdP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="devidp_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve discovery, JWKS and the token endpoint (development only)")
    serve.add_argument("--config", required=True, metavar="FILE", help="YAML: issuer, users, clients, lifetimes")
    serve.add_argument("--addr", default=None, metavar="HOST:PORT", help="listen address (overrides 'addr')")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_devidp_config(args.config)
    except ConfigError as exc:
        print(f"config error: {exc.message}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(DevIdP(config), args.addr))


async def _serve(idp: DevIdP, addr: str | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        issuer = await idp.start(addr)
    except OSError as exc:
        print(f"devidp: cannot listen on {addr or idp.config.addr}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"devidp: DEVELOPMENT ONLY provider for {issuer} "
          f"(discovery {issuer}/.well-known/openid-configuration)", flush=True)
    try:
        await stop.wait()
    finally:
        await idp.stop()
    return 0
