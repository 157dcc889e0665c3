"""``authz-server evaluate``: measure the zero-trust mesh and write a report a reader can check.

Three questions, each answered by its own module:

* what does it stop — ``attacks.py``: scripted attacks with an expected outcome, run against a
  ``Target`` (``targets.py``) with zero trust on and off, each outcome checked in the audit log;
* how sure are we — ``accuracy.py``: traffic from ``traffic.py`` decided by the real pipeline and
  compared, request by request, with ``oracle.py``, an independent statement of the intended
  access matrix;
* what does it cost — ``perf.py`` (real Envoy, wrk) and ``growth.py`` (policy and session store size).

``report.py`` turns the results into ``report.md``, PNG charts and ``results.json``; ``cli.py``
is the command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time each name is imported on first use
    from .accuracy import run_accuracy
    from .cli import Options, evaluate
    from .oracle import Oracle
    from .traffic import generate

_FROM = {
    "accuracy": ("run_accuracy",),
    "cli": ("Options", "evaluate"),
    "oracle": ("Oracle",),
    "traffic": ("generate",),
}
__getattr__ = lazy_exports(__name__, _FROM)

__all__ = ["Options", "Oracle", "evaluate", "generate", "run_accuracy"]
