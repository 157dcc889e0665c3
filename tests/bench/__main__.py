"""``make bench``: every benchmark, measured in one run, printed as tables (and saved as JSON).

    python -m tests.bench [--quick] [--only core,...] [--json bench-results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .harness import Settings, save, wrk_binary

SECTIONS = ["core", "sessions", "transport", "signals", "handshake", "workload", "hostile"]
OPT_IN = ["ladder"]  # only with --only: explains a figure above, adds minutes


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--quick", action="store_true", help="short runs (3 s each) for a first look")
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS + OPT_IN)}")
    parser.add_argument("--json", default="bench-results.json", help="where to save the raw numbers")
    args = parser.parse_args()
    settings = Settings.quick() if args.quick else Settings()
    chosen = args.only.split(",") if args.only else SECTIONS
    if wrk_binary() is None:
        print("wrk is not installed (Debian: apt-get install wrk): only in-process numbers are measured.",
              file=sys.stderr)
    results: dict[str, object] = {}
    if "core" in chosen:
        from . import core

        inproc = asyncio.run(core.in_process())
        envoy, rounds = core.through_envoy(settings) if wrk_binary() else ({}, [])
        results["core"] = {"in_process": inproc, "envoy": envoy, "authz_over_bare_by_round": rounds}
        print(core.report(inproc, envoy, rounds) if envoy else inproc)
    if "sessions" in chosen:
        from . import sessions

        results["sessions"], text = sessions.run(settings, with_envoy=wrk_binary() is not None)
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
    if "workload" in chosen:
        from . import workload

        results["workload"], text = workload.run()
        print(text)
    if "hostile" in chosen:
        from . import hostile

        results["hostile"], text = hostile.run(settings)
        print(text)
    save(results, Path(args.json))
    print(f"\nraw numbers saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
