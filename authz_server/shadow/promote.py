"""Promoting the shadow policy to live: the operation behind the admin API's ``PromoteShadow``.

The shadow's policy set is offered to the live runtime (``PolicyRuntime.offer``): it serves
only once it passes the gate every policy change passes, and on failure the live policy is
untouched. ``expect_version`` guards against promoting a set other than the one reviewed
(the shadow may have reloaded since).
"""

from __future__ import annotations

from ..errors import PolicyError
from ..policy.loader import ActivePolicy, PolicyRuntime
from .evaluator import ShadowEvaluator


async def promote(shadow: ShadowEvaluator | None, live: PolicyRuntime, *, expect_version: str = "",
                  by: str = "") -> ActivePolicy:
    if shadow is None:
        raise PolicyError("no shadow policy is configured", code="shadow_not_configured")
    candidate = shadow.runtime.active
    if candidate is None:
        raise PolicyError("the shadow policy is not loaded", code="shadow_not_loaded")
    if expect_version and candidate.version != expect_version:
        raise PolicyError(f"the shadow policy is now {candidate.version}, not {expect_version}",
                          code="shadow_version_changed")
    if not await live.offer(candidate.policy_set, origin=f"shadow promotion{f' by {by}' if by else ''} "
                                                         f"({shadow.runtime.root})"):
        raise PolicyError(f"the live runtime refused the shadow policy: {live.status.last_error}",
                          code=live.status.last_error_code or "policy_error")
    assert live.active is not None
    return live.active
