"""Decision-log mask and drop rules written in Rego, as OPA supports them.

``decision_logs.drop_decision`` (default ``/system/log/drop``) and ``mask_decision`` (default
``/system/log/mask``) name rules in the policy that serves; each is evaluated with the
decision event as ``input``. A drop rule that is ``true`` keeps the event out of the upload. A
mask rule gives a set of JSON pointers under ``/input``, ``/result`` or ``/nd_builtin_cache`` to
erase, or objects ``{"op": "remove"|"upsert", "path": ..., "value": ...}``; erased paths are
listed in the event's ``erased``, upserted ones in ``masked`` (OPA's ``plugins/logs/mask.go``:
a path that is not there is skipped; path segments are matched as Go's ``url.PathEscape``
writes them). As OPA does, an event whose rules cannot be evaluated is not uploaded.

The rules run where the decision-log sink prepares a batch, never on the request path.
``evaluate_rule`` is the one place they meet the Rego engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, unquote

from ..policy.engine import UNDEFINED, CompiledPolicy, encode_input
from ..policy.pool import EvaluatorPool
from ..policy.source import PolicySet

_PARTS = ("input", "result", "nd_builtin_cache")


class MaskRuleError(ValueError):
    pass


@dataclass(frozen=True)
class MaskRule:
    op: str  # remove | upsert
    path: str
    parts: tuple[str, ...]  # escaped as OPA escapes them
    value: Any = None

    @classmethod
    def parse(cls, path: Any, op: Any = "remove", value: Any = None) -> "MaskRule":
        if not isinstance(path, str) or not path:
            raise MaskRuleError("mask must be non-empty")
        if not path.startswith("/"):
            raise MaskRuleError("mask must be slash-prefixed")
        parts = path[1:].split("/")
        if parts[0] not in _PARTS:
            raise MaskRuleError(f"mask prefix not allowed: {parts[0]}")
        if op not in ("remove", "upsert"):
            raise MaskRuleError(f"mask op is not supported: {op}")
        escaped = tuple(quote(unquote(part), safe="$&+:=@") for part in parts)
        return cls(op, path, escaped, value)

    def apply(self, event: dict[str, Any]) -> None:
        part = self.parts[0]
        if event.get(part) is None:
            return
        rest = list(self.parts[1:])
        if self.op == "remove":
            if not rest:
                del event[part]
            elif not _remove(event[part], rest):
                return
            event.setdefault("erased", []).append("/" + "/".join(self.parts))
        else:
            if not rest:
                event[part] = self.value
            elif not isinstance(event[part], dict) or not _upsert(event[part], rest, self.value):
                return
            event.setdefault("masked", []).append("/" + "/".join(self.parts))


def _remove(node: Any, path: list[str]) -> bool:
    for key in path[:-1]:
        node = _child(node, key)
        if node is None:
            return False
    last = path[-1]
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        del node[int(last)]
        return True
    return False


def _child(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return node[int(key)]
    return None


def _upsert(node: Any, path: list[str], value: Any) -> bool:
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and key.isdigit():
            while len(node) <= int(key):
                node.append(None)
            node = node[int(key)]
        else:
            return False
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
        return True
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
        return True
    return False


def parse_mask_rules(value: Any) -> list[MaskRule]:
    """The mask rule's value (a set, i.e. a JSON array) → rules; ``MaskRuleError`` if malformed."""
    if not isinstance(value, list):
        raise MaskRuleError(f"unexpected rule format {value!r}")
    rules = []
    for item in value:
        if isinstance(item, str):
            rules.append(MaskRule.parse(item))
        elif isinstance(item, dict):
            rules.append(MaskRule.parse(item.get("path"), item.get("op", "remove") or "remove", item.get("value")))
        else:
            raise MaskRuleError(f"invalid mask rule format encountered: {type(item).__name__}")
    return rules


def evaluate_rule(pool: EvaluatorPool, event: dict[str, Any]) -> Any:
    """The one place the log rules are evaluated: the rule's value for this event, or UNDEFINED."""
    return pool.evaluate_now(encode_input(event))


def _declares(policy_set: PolicySet, rule_path: str) -> bool:
    """Whether any module could define ``rule_path`` (its package is a prefix of it)."""
    package = rule_path.split("/")[:-1]
    for source in policy_set.serving_modules.values():
        match = re.search(r"^\s*package\s+([\w.]+)", source, re.MULTILINE)
        if match and package[:len(match.group(1).split("."))] == match.group(1).split("."):
            return True
    return False


class DecisionLogRules:
    """Drop and mask for one event, with the rules of whatever policy serves now."""

    def __init__(self, policy: Callable[[], PolicySet | None], *, drop_path: str = "system/log/drop",
                 mask_path: str = "system/log/mask") -> None:
        self._policy = policy
        self.paths = {"drop": drop_path, "mask": mask_path}
        self._version = ""
        self._pools: dict[str, EvaluatorPool | None] = {}

    def _pool(self, which: str) -> EvaluatorPool | None:
        policy_set = self._policy()
        if policy_set is None:
            return None
        if policy_set.version != self._version:
            self.close()
            self._version = policy_set.version
            for name, path in self.paths.items():
                self._pools[name] = (EvaluatorPool(CompiledPolicy(policy_set, "data." + path.replace("/", ".")),
                                                   size=1, isolation="inline")
                                     if _declares(policy_set, path) else None)
        return self._pools.get(which)

    def apply(self, event: dict[str, Any]) -> bool:
        """False: drop the event. Masks ``event`` in place; raises ``AuthzError`` (from the
        engine) or ``MaskRuleError`` when a rule cannot be used (the caller drops the event)."""
        drop = self._pool("drop")
        if drop is not None and evaluate_rule(drop, event) is True:
            return False
        mask = self._pool("mask")
        if mask is not None:
            value = evaluate_rule(mask, event)
            if value is not UNDEFINED:
                for rule in parse_mask_rules(value):
                    rule.apply(event)
        return True

    def close(self) -> None:
        for pool in self._pools.values():
            if pool is not None:
                pool.close()
        self._pools.clear()
