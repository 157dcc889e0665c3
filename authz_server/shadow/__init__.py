"""Shadow rollout: a second policy decides every sampled request beside the live one, off the
request path, and every disagreement is counted and written down (docs/bundles.md).

``ShadowEvaluator`` (``evaluator``) runs it; ``compare`` says when two answers disagree;
``report`` summarises the records; ``promote`` makes the shadow policy the live one; ``cli``
is ``authz-server shadow``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time each name is imported on first use
    from .compare import disagreement
    from .evaluator import ShadowEvaluator, ShadowStats
    from .report import ShadowReport, summarize

_FROM = {
    "compare": ("disagreement",),
    "evaluator": ("ShadowEvaluator", "ShadowStats"),
    "report": ("ShadowReport", "summarize"),
}
__getattr__ = lazy_exports(__name__, _FROM)

__all__ = [
    "ShadowEvaluator", "ShadowReport", "ShadowStats", "disagreement", "summarize",
]
