"""A scripted tour: steps that each say what they do, do it, and check what came back.

The demo is a tour. Each step prints in plain words what happened and whether that is what
the tour promised; the run fails (non-zero, naming the step) if any step did not turn out
as promised, so the demo doubles as an end-to-end check.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TextIO


@dataclass
class Outcome:
    ok: bool
    said: str  # what happened, in plain words


@dataclass
class Step:
    title: str  # what the step does and what should happen
    run: Callable[[], Awaitable[Outcome]]


@dataclass
class TourResult:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def _colour(out: TextIO) -> bool:
    return hasattr(out, "isatty") and out.isatty()


async def run_tour(steps: list[Step], out: TextIO = sys.stdout) -> TourResult:
    result = TourResult()
    tty = _colour(out)
    green, red, dim, reset = ("\033[32m", "\033[31m", "\033[2m", "\033[0m") if tty else ("", "", "", "")
    for number, step in enumerate(steps, 1):
        started = time.perf_counter()
        try:
            outcome = await step.run()
        except Exception as exc:  # a step that blows up is a failed step, reported as such
            outcome = Outcome(False, f"the step raised {type(exc).__name__}: {exc}")
        elapsed = (time.perf_counter() - started) * 1000
        mark = f"{green}✔{reset}" if outcome.ok else f"{red}✘{reset}"
        print(f"{mark} {number:2d}. {step.title}", file=out)
        for line in outcome.said.splitlines():
            print(f"       {dim}{line}{reset}", file=out)
        print(f"       {dim}({elapsed:.0f} ms){reset}", file=out)
        (result.passed if outcome.ok else result.failed).append(f"{number}. {step.title}")
    return result


def expect_status(got: int, want: int, what: str) -> Outcome:
    verdict = "as expected" if got == want else f"but the tour expected {want}"
    return Outcome(got == want, f"{what}: HTTP {got}, {verdict}")
