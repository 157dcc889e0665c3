"""``authz-server evaluate --out DIR [--quick]``: attacks, accuracy against an oracle,
performance through real Envoy, growth; writes DIR/report.md, its charts, DIR/results.json.

Exit 0 when every part ran (whatever the figures say); 1 naming the parts that broke (the
report is still written with what was measured).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from .world import Limits

# The attack world's signals: low enough that a flood and a guessing spree cross them within a
# second, high enough that no other scenario (each has identities of its own) comes near.
ATTACK_LIMITS = Limits(rate=0.5, burst=30, failure_rate=0.1, failure_burst=10)
FULL_REQUESTS = 15_000
QUICK_REQUESTS = 3_000


def default_policies() -> Path:
    here = Path(__file__).resolve().parents[2] / "policies"
    return here if here.is_dir() else Path("policies")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for report.md, its PNG charts and results.json")
    parser.add_argument("--quick", action="store_true",
                        help=f"a first look in about a minute: {QUICK_REQUESTS:,} accuracy requests instead of "
                             f"{FULL_REQUESTS:,}, 2-second load runs, sessions up to 10^5")
    parser.add_argument("--policies", help="the policy folder to evaluate (default: the repository's policies/)")
    parser.add_argument("--requests", type=int, help="accuracy traffic size (default: 15,000; --quick: 3,000)")
    parser.add_argument("--seed", type=int, default=8, help="seed of the generated traffic (default 8)")
    parser.add_argument("--workdir", help="keep logs, rendered configs and audit logs here (default: a temporary "
                                          "folder, removed when the run succeeds)")


@dataclass(frozen=True)
class Options:
    out: Path
    quick: bool
    policies: Path
    requests: int
    seed: int
    workdir: Path
    keep_workdir: bool


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="authz-evaluate-"))
    options = Options(out=Path(args.out), quick=bool(args.quick),
                      policies=Path(args.policies) if args.policies else default_policies(),
                      requests=args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS), seed=args.seed,
                      workdir=workdir, keep_workdir=bool(args.workdir))
    if not (options.policies / "data.yaml").exists():
        print(f"evaluate: {options.policies} has no data.yaml: the oracle needs the route table", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    return asyncio.run(evaluate(options))


def say(line: str) -> None:
    print(f"evaluate: {line}", flush=True)


async def evaluate(options: Options) -> int:
    from .report import Evaluation, write

    evaluation = Evaluation(options.quick, time.time(), options.policies, ATTACK_LIMITS)
    say(f"{'quick' if options.quick else 'full'} run; policies {options.policies}; work folder {options.workdir}")

    async def phase(name: str, body: Callable[[], Awaitable[Any]]) -> None:
        started = time.perf_counter()
        say(f"{name} ...")
        try:
            await body()
        except Exception as exc:  # one broken part must not hide the others' results
            evaluation.broken.append((name, f"{type(exc).__name__}: {exc}"))
            say(f"{name} BROKE: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
        else:
            say(f"{name} done in {time.perf_counter() - started:.1f}s")

    await phase("attacks", lambda: _attacks(options, evaluation))
    await phase("accuracy", lambda: _accuracy(options, evaluation))
    await phase("performance", lambda: _performance(options, evaluation))
    await phase("growth", lambda: _growth(options, evaluation))
    evaluation.finished = time.time()
    report = write(options.out, evaluation)
    if evaluation.broken:
        say(f"incomplete: {', '.join(name for name, _ in evaluation.broken)} broke; logs kept in {options.workdir}")
        print(f"evaluate: failed: {'; '.join(f'{n}: {e}' for n, e in evaluation.broken)}", file=sys.stderr)
    elif not options.keep_workdir:
        shutil.rmtree(options.workdir, ignore_errors=True)
    say(f"report written: {report.resolve()} (results.json and charts beside it)")
    return 1 if evaluation.broken else 0


async def _attacks(options: Options, evaluation: Any) -> None:
    from ..mesh.processes import Supervisor
    from .attacks import run_suite
    from .frontproxy import EnvoyTarget, EnvoyWorld
    from .inprocess import InProcessTarget, InProcessWorld

    folder = options.workdir / "attacks"
    world = await EnvoyWorld.create(options.policies, folder / "envoy")
    try:
        with Supervisor(folder / "logs") as supervisor:
            zero_trust = await EnvoyTarget(world, supervisor, zero_trust=True, limits=ATTACK_LIMITS).start()
            say(f"attacks: {zero_trust.name} up")
            evaluation.zero_trust = await run_suite(zero_trust, ATTACK_LIMITS, progress=say)
            baseline = await EnvoyTarget(world, supervisor, zero_trust=False).start()
            say(f"attacks: {baseline.name} up")
            evaluation.baseline = await run_suite(baseline, ATTACK_LIMITS, progress=say)
    finally:
        await world.close()
    local = await InProcessWorld.create(options.policies, folder / "in-process", limits=ATTACK_LIMITS)
    try:
        evaluation.in_process = await run_suite(InProcessTarget(local), ATTACK_LIMITS, progress=say)
    finally:
        await local.close()


async def _accuracy(options: Options, evaluation: Any) -> None:
    from .accuracy import run_accuracy

    evaluation.accuracy = await run_accuracy(options.policies, options.workdir / "accuracy", count=options.requests,
                                             seed=options.seed, quick=options.quick, progress=say)
    result = evaluation.accuracy
    say(f"accuracy: {result.requests:,} requests, {len(result.mismatches)} mismatches "
        f"({result.accuracy * 100:.2f} % agreement) in {result.seconds:.1f}s")


async def _performance(options: Options, evaluation: Any) -> None:
    from .load import Settings
    from .perf import measure

    settings = Settings(duration=2.0, warmup=1.0) if options.quick else Settings()
    evaluation.performance = await measure(options.policies, options.workdir / "performance", settings, progress=say)


async def _growth(options: Options, evaluation: Any) -> None:
    from .growth import SESSION_SIZES, policy_growth, session_growth

    seconds = 0.3 if options.quick else 1.5
    evaluation.policy_growth = await policy_growth(options.policies, options.workdir / "growth", seconds=seconds,
                                                   progress=say)
    sizes = tuple(n for n in SESSION_SIZES if n <= 100_000) if options.quick else SESSION_SIZES
    evaluation.session_growth = await asyncio.to_thread(session_growth, sizes=sizes, seconds=seconds / 2,
                                                        progress=say)
