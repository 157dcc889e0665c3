"""``authz-server shadow report | status | promote``.

``report`` reads the audit log (``--audit file:PATH`` or ``postgresql://...``); ``status`` and
``promote`` talk to a running server's admin API over mTLS (``--admin HOST:PORT`` with a
client certificate whose SPIFFE ID is in ``admin.allowed``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from ..errors import AuthzError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="shadow_command", metavar="SUBCOMMAND", required=True)
    report = sub.add_parser("report", help="summarise the shadow policy's disagreements from the audit log")
    report.add_argument("--audit", required=True, help="the audit sink the server writes: file:PATH or postgresql://")
    report.add_argument("--since", default="-24h", help="start of the window (RFC 3339, now, -1h...; default -24h)")
    report.add_argument("--until", default="now", help="end of the window (default now)")
    report.add_argument("--examples", type=int, default=5, help="example decisions to list (default 5)")
    report.add_argument("--json", action="store_true", help="the summary as JSON")
    from ..audit.cli import _RELATIVE_OR_NUMBER

    if hasattr(report, "_negative_number_matcher"):
        report._negative_number_matcher = _RELATIVE_OR_NUMBER
    for name, text in (("status", "the shadow policy of a running server and its counts"),
                       ("promote", "make a running server's shadow policy its live policy (through the normal gate)")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--admin", required=True, help="the server's admin address, host:port")
        command.add_argument("--cert", required=True, help="client certificate (PEM; its SPIFFE ID in admin.allowed)")
        command.add_argument("--key", required=True, help="its private key (PEM)")
        command.add_argument("--ca", required=True, help="CA bundle the server's certificate chains to (PEM)")
        command.add_argument("--server-name", default="", help="name to verify in the server's certificate "
                                                               "(default: the host of --admin)")
        if name == "promote":
            command.add_argument("--expect-version", default="",
                                 help="refuse unless the shadow policy is still this version (see 'shadow status')")


def _report(args: argparse.Namespace) -> int:
    from ..audit.query import parse_time
    from .report import format_report, load_records, summarize

    now = time.time()
    since, until = parse_time(args.since, now=now), parse_time(args.until, now=now)
    report = summarize(load_records(args.audit, since=since, until=until), since=since, until=until,
                       examples=args.examples)
    print(json.dumps(report.to_json(), indent=1) if args.json else format_report(report))
    return 0


async def _admin(args: argparse.Namespace) -> int:
    import grpc

    from .._proto import authz_admin_pb2 as pb
    from .._proto import authz_admin_pb2_grpc as pb_grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.ca).read_bytes(),
                                               private_key=Path(args.key).read_bytes(),
                                               certificate_chain=Path(args.cert).read_bytes())
    host = args.server_name or args.admin.rpartition(":")[0]
    async with grpc.aio.secure_channel(args.admin, credentials,
                                       options=[("grpc.ssl_target_name_override", host)]) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            if args.shadow_command == "status":
                state = await stub.GetShadow(pb.GetShadowRequest(), timeout=10)
                print(json.dumps({"configured": state.configured, "version": state.version,
                                  "revision": state.revision, "source": state.source,
                                  "live_version": state.live_version, "compared": state.compared,
                                  "disagreements": json.loads(state.disagreements_json or "{}")}, indent=1))
                return 0
            promoted = await stub.PromoteShadow(pb.PromoteShadowRequest(expect_version=args.expect_version),
                                                timeout=120)
        except grpc.aio.AioRpcError as exc:
            print(f"authz-server shadow: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"promoted: policy {promoted.policy_version} (revision {promoted.revision!r}) now serves")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.shadow_command == "report":
            return _report(args)
        return asyncio.run(_admin(args))
    except AuthzError as exc:
        print(f"authz-server shadow: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"authz-server shadow: {exc}", file=sys.stderr)
        return 2
