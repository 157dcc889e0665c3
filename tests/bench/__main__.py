"""``make bench``: every benchmark, measured in one run, printed as tables (and saved as JSON).

    python -m tests.bench [--quick] [--only core,...] [--json bench-results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .harness import Settings, save, wrk_binary

SECTIONS = ["traffic", "core", "sessions", "browser", "transport", "signals", "handshake", "workload", "hostile",
            "tracing", "audit"]
OPT_IN = ["ladder", "control_plane", "scaling"]  # only with --only: ladder explains a figure above; control_plane
# holds a collector down for 60 s; scaling kills stores and replicas (all add minutes)


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--quick", action="store_true", help="short runs (3 s each) for a first look")
    parser.add_argument("--smoke", action="store_true", help="one-second runs, one round: checks every part runs")
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS + OPT_IN)}")
    parser.add_argument("--json", default="bench-results.json", help="where to save the raw numbers")
    args = parser.parse_args()
    settings = Settings.smoke_test() if args.smoke else Settings.quick() if args.quick else Settings()
    chosen = args.only.split(",") if args.only else SECTIONS
    if wrk_binary() is None:
        print("wrk is not installed (Debian: apt-get install wrk): only in-process numbers are measured.",
              file=sys.stderr)
    results: dict[str, object] = {}
    if "traffic" in chosen:
        from . import traffic

        results["traffic"], text = traffic.run(settings, with_envoy=wrk_binary() is not None)
        print(text)
    if "core" in chosen:
        from . import core

        inproc = asyncio.run(core.in_process())
        envoy, rounds = core.through_envoy(settings) if wrk_binary() else ({}, {})
        results["core"] = {"in_process": inproc, "envoy": envoy, "authz_over_reference_by_round": rounds}
        print(core.report(inproc, envoy, rounds) if envoy else inproc)
    if "sessions" in chosen:
        from . import sessions

        results["sessions"], text = sessions.run(settings, with_envoy=wrk_binary() is not None)
        print(text)
    if "browser" in chosen:
        from . import browser

        results["browser"], text = browser.run()
        print(text)
    if "transport" in chosen and wrk_binary():
        from . import transport

        results["transport"], text = transport.run(settings)
        print(text)
    if "signals" in chosen:
        from . import signals

        results["signals"], text = signals.run()
        print(text)
    if "handshake" in chosen and wrk_binary():
        from . import handshake

        results["handshake"], text = handshake.run(settings)
        print(text)
    if "ladder" in chosen and wrk_binary():
        from . import ladder

        results["ladder"], text = ladder.run(settings)
        print(text)
    if "control_plane" in chosen:
        from . import control_plane

        results["control_plane"] = asyncio.run(control_plane.run(args.quick))
        print(control_plane.report(results["control_plane"]))
    if "scaling" in chosen:
        from . import scaling

        results["scaling"], text = scaling.run()
        print(text)
    if "workload" in chosen:
        from . import workload

        results["workload"], text = workload.run()
        print(text)
    if "hostile" in chosen:
        from . import hostile

        results["hostile"], text = hostile.run(settings)
        print(text)
    if "tracing" in chosen:
        from . import tracing

        results["tracing"], text = tracing.run(smoke=settings.smoke)
        print(text)
    if "audit" in chosen:
        from . import audit

        results["audit"], text = audit.run(settings, with_envoy=wrk_binary() is not None)
        print(text)
    save(results, Path(args.json))
    print(f"\nraw numbers saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
