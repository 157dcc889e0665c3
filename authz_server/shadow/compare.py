"""What a policy answered, reduced to what Envoy would do, and how two answers differ.

Pure: plain values in, a kind out. Kinds (``authz_shadow_disagreements_total{kind}``):
``allow_to_deny`` (live allows, shadow would deny), ``deny_to_allow``, ``status_differs``
(both deny, with different HTTP statuses), ``headers_differ`` (same verdict and status, but
other headers, headers removed, query parameters or deny body). Dynamic metadata is not
compared: it carries the decision id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import AuthzError
from ..policy.engine import UNDEFINED
from ..response import Verdict, read_result

if TYPE_CHECKING:
    from ..decision import Decision

KINDS = ("allow_to_deny", "deny_to_allow", "status_differs", "headers_differ")


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    http_status: int
    headers: tuple[Any, ...] = ()  # everything else Envoy would apply, normalized
    error: str = ""  # the code when the policy gave no usable answer (which denies)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"allowed": self.allowed, "http_status": self.http_status}
        if self.error:
            document["error"] = self.error
        return document


def _pairs(headers: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(name).lower(), str(value)) for name, value in headers))


def from_verdict(verdict: Verdict) -> Outcome:
    rest: tuple[Any, ...]
    if verdict.allowed:
        rest = (_pairs(verdict.headers), _pairs(verdict.response_headers_to_add),
                tuple(sorted(h.lower() for h in verdict.request_headers_to_remove)),
                tuple(sorted(verdict.query_parameters_to_set)), tuple(sorted(verdict.query_parameters_to_remove)))
        return Outcome(True, 200, rest)
    return Outcome(False, verdict.http_status, (_pairs(verdict.headers), verdict.body))


def live_outcome(decision: "Decision") -> Outcome | None:
    """What the live policy answered, or None when the policy was not asked (the request was
    refused before: identity, a bad request, a dependency down)."""
    if decision.phase != "policy":
        return None
    if decision.verdict is not None:
        return from_verdict(decision.verdict)
    if decision.code == "policy_not_loaded":
        return None
    return Outcome(False, decision.http_status, error=decision.code)


def shadow_outcome(result: Any, *, deny_status: int) -> Outcome:
    """The shadow policy's raw value as an outcome, read as strictly as the live one."""
    if result is UNDEFINED:
        return Outcome(False, deny_status, error="policy_undefined")
    try:
        return from_verdict(read_result(result))
    except AuthzError as exc:
        return Outcome(False, deny_status, error=exc.code)


def disagreement(live: Outcome, shadow: Outcome) -> str | None:
    if live.allowed != shadow.allowed:
        return "allow_to_deny" if live.allowed else "deny_to_allow"
    if live.http_status != shadow.http_status:
        return "status_differs"
    if live.headers != shadow.headers:
        return "headers_differ"
    return None
