"""Explain mode: the next N decisions for one subject or one route, explained in the audit log.

An operator switches it on through the admin API (``StartExplain``: a subject *or* a route, an
explanation mode, a count N and a time to live). While a rule is live, every decision that
matches it is evaluated with OPA's trace recorded, bypassing the decision cache and the fronts'
repeat paths, and its audit record carries ``explanation`` (``policy.explain``: why the policy
answered as it did). A rule explains at most N decisions and none after its deadline; then it
is gone. With no live rule the pipeline's ``explaining`` is None: nothing is matched.

* A subject matches the audit log's ``subject`` or ``spiffe_id`` (the verified user's ``sub``,
  or the workload's SPIFFE ID); a route is a path prefix, by whole segments (``/orders``
  matches ``/orders`` and ``/orders/7``, not ``/orderscan``; the query is ignored).
* The count is claimed when the decision is made, after identity: a decision that then fails
  (a policy timeout) still used its turn, so an operator never sees more than N.
* Explanations are redacted as the audit log redacts the input they came from: every value the
  ``audit.redact`` rules mask in the input the policy saw (tokens, session ids, cookies, token
  parameters) is masked wherever it appears in the explanation, and credential shapes
  (JWTs, ``Bearer ...``) too; ``Unify`` events and variable bindings are never included (see
  ``policy.explain``), so what is left is the policy's own text and its ``trace()`` notes.

State is per server process: with ``--workers N``, the admin call reaches one worker, and the
rule explains what that worker decides.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from .audit.record import who
from .audit.redact import REDACTED, Redactor, scrub_text
from .errors import AuthzError
from .policy.engine import Traced
from .policy.explain import explain

MODES = ("notes", "fails", "full")  # not debug: its Unify events carry input values
MAX_COUNT = 1000
MAX_TTL = 3600.0
MAX_RULES = 32
MAX_EVENTS = 500  # trace lines kept in one audit record


class ExplainError(AuthzError):
    default_code = "explain_invalid"


@dataclass
class ExplainRule:
    """One live switch: explain the next ``remaining`` decisions of ``subject`` or ``route``."""

    subject: str
    route: str
    mode: str
    remaining: int
    until: float  # Unix seconds
    created_by: str = ""
    explained: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def matches(self, identity: Mapping[str, Any], path: str) -> bool:
        if self.subject:
            return self.subject in who(identity)
        path = path.partition("?")[0]
        return path == self.route or path.startswith(self.route if self.route.endswith("/") else self.route + "/")


class ExplainMode:
    """The live rules; ``attach`` it to the pipeline it switches."""

    def __init__(self, *, redactor: Redactor | None = None, max_events: int = MAX_EVENTS) -> None:
        self.rules: list[ExplainRule] = []
        self.redactor = redactor or Redactor()
        self.max_events = max_events
        self._pipeline: Any = None

    def attach(self, pipeline: Any) -> None:
        self._pipeline = pipeline
        self._switch()

    def _switch(self) -> None:
        if self._pipeline is not None:
            self._pipeline.explaining = self if self.rules else None

    # -- the admin side

    def start(self, *, subject: str = "", route: str = "", mode: str = "fails", count: int = 10,
              ttl: float = 300.0, now: float, by: str = "") -> ExplainRule:
        if bool(subject) == bool(route):
            raise ExplainError("name a subject or a route (one of them)")
        if route and not route.startswith("/"):
            raise ExplainError(f"a route is a path prefix starting with '/', got {route[:64]!r}")
        if mode not in MODES:
            raise ExplainError(f"mode must be one of {', '.join(MODES)}, got {mode[:32]!r}")
        if not 1 <= count <= MAX_COUNT:
            raise ExplainError(f"count must be between 1 and {MAX_COUNT}, got {count}")
        if not 0 < ttl <= MAX_TTL:
            raise ExplainError(f"ttl must be more than 0 and at most {MAX_TTL:.0f} seconds, got {ttl}")
        self._prune(now)
        if len(self.rules) >= MAX_RULES:
            raise ExplainError(f"{MAX_RULES} explain rules are live already: stop one first", code="explain_busy")
        rule = ExplainRule(subject, route.partition("?")[0] if route else "", mode, count, now + ttl, by)
        self.rules.append(rule)
        self._switch()
        return rule

    def stop(self, rule_id: str = "") -> int:
        """Stop one rule (by id) or, with no id, all of them; how many were stopped."""
        before = len(self.rules)
        self.rules = [rule for rule in self.rules if rule_id and rule.id != rule_id]
        self._switch()
        return before - len(self.rules)

    def live(self, now: float) -> list[ExplainRule]:
        self._prune(now)
        return list(self.rules)

    def _prune(self, now: float) -> None:
        kept = [rule for rule in self.rules if rule.remaining > 0 and rule.until > now]
        if len(kept) != len(self.rules):
            self.rules = kept
            self._switch()

    # -- the pipeline's side

    def wants(self, identity: Mapping[str, Any], path: str, now: float) -> bool:
        """Would a decision about this be explained? (The repeat paths ask: then they step aside.)"""
        self._prune(now)
        return any(rule.matches(identity, path) for rule in self.rules)

    def claim(self, identity: Mapping[str, Any], path: str, now: float) -> Ticket | None:
        """A ticket to explain this decision, using one of its rule's turns; None if no rule matches."""
        self._prune(now)
        for rule in self.rules:
            if rule.matches(identity, path):
                rule.remaining -= 1
                rule.explained += 1
                self._prune(now)
                return Ticket(self, rule.mode)
        return None

    def explanation(self, traced: Traced, mode: str, document: Mapping[str, Any] | None,
                    modules: Mapping[str, str]) -> dict[str, Any]:
        """``traced`` explained in ``mode``, redacted as the input ``document`` is (module docstring)."""
        explained = explain(traced.events, mode, defined=bool(traced.result), modules=modules,
                            max_events=self.max_events).to_json()
        fragments = secret_fragments(self.redactor, document) if document else []
        return _scrub(explained, fragments)


class Ticket:
    """One decision to explain: the pipeline evaluates with the trace on and hands it to
    ``explain``; ``explanation`` is what its audit record carries (None if it never got that far)."""

    __slots__ = ("owner", "mode", "explanation")

    def __init__(self, owner: ExplainMode, mode: str) -> None:
        self.owner, self.mode = owner, mode
        self.explanation: dict[str, Any] | None = None

    def explain(self, traced: Traced, document: Mapping[str, Any] | None, modules: Mapping[str, str]) -> None:
        self.explanation = self.owner.explanation(traced, self.mode, document, modules)


def secret_fragments(redactor: Redactor, document: Mapping[str, Any]) -> list[str]:
    """The parts of ``document``'s strings that the audit redaction masks or erases, longest first."""
    redacted = redactor.redact_input_parts(document)
    found: set[str] = set()
    for pointer in redacted.masked:
        original, masked = _at(document, pointer), _at(redacted.members, pointer)
        for before, after in _pairs(original, masked):
            found.update(_hidden(before, after))
    for pointer in redacted.erased:
        found.update(_strings(_at(document, pointer)))
    return sorted((f for f in found if len(f) >= 4), key=len, reverse=True)


def _pairs(original: Any, masked: Any) -> list[tuple[str, str]]:
    if isinstance(original, str):
        return [(original, masked if isinstance(masked, str) else REDACTED)]
    if isinstance(original, list):
        return [pair for i, item in enumerate(original)
                for pair in _pairs(item, masked[i] if isinstance(masked, list) and i < len(masked) else REDACTED)]
    return [(text, REDACTED) for text in _strings(original)]


def _hidden(original: str, masked: str) -> list[str]:
    """What ``masked`` replaced with ``[REDACTED]`` in ``original``."""
    literal = masked.split(REDACTED)
    if len(literal) == 1:
        return [original] if original != masked else []
    match = re.fullmatch("(.+?)".join(map(re.escape, literal)), original, re.DOTALL)
    return list(match.groups()) if match else [original]


def _at(document: Any, pointer: str) -> Any:
    node = document
    for part in pointer.split("/")[2:]:  # "/input/..." -> the input's own members
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping):
            node = node.get(key)
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


def _scrub(value: Any, fragments: list[str]) -> Any:
    if isinstance(value, str):
        for fragment in fragments:
            if fragment in value:
                value = value.replace(fragment, REDACTED)
            quoted = json.dumps(fragment, ensure_ascii=False)[1:-1]  # as a Rego string literal shows it
            if quoted != fragment and quoted in value:
                value = value.replace(quoted, REDACTED)
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {key: _scrub(item, fragments) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item, fragments) for item in value]
    return value


__all__ = ["MODES", "ExplainError", "ExplainMode", "ExplainRule", "Ticket", "secret_fragments"]
