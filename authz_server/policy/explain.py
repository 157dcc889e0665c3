"""Why a policy answered as it did: OPA's evaluation trace, filtered and summarised.

The engine records a trace when asked (``engine.Evaluator.evaluate_traced`` /
``query_traced``); this module reads it as ``opa eval --explain`` does:

* ``lineage(events, mode)``: OPA's explanation modes. ``notes`` keeps the ``Note`` events
  (``trace(msg)`` calls) and ``fails`` the ``Fail`` events, each with the chain of rule and
  body entries that led to it; ``full`` keeps everything but ``Unify`` (OPA's ``Full``);
  ``debug`` keeps every event.
* ``pretty(events)``: the lines ``opa eval --explain`` prints (OPA's ``PrettyTraceWithLocation``:
  the location, the depth as ``| `` bars, the operation, the rule path or expression).
* ``summarize(...)``: which rules were evaluated, how often each succeeded, where each one that
  never succeeded stopped (the expression and its source line), and which rules gave the result.

Pure: no engine, no I/O. What the events may carry: ``Unify`` nodes and ``locals`` hold values
(input included), ``Note`` messages whatever the policy wrote; rule, body, ``Eval``, ``Fail``
and ``Exit`` nodes are the policy's own text. ``explain`` leaves ``Unify`` out unless the mode
is ``debug``, and never copies ``locals``: the server's explanations are then the policy's own
words, with notes redacted by the caller (see ``explaining``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

MODES = ("notes", "fails", "full", "debug")
MAX_FAILURES_PER_RULE = 3

Event = Mapping[str, Any]

_FILE_LOCATION = re.compile(r"^(?P<file>.+):(?P<row>\d+)$")
_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
# A rule as OPA prints one: an optional `default`, the head's name (a ref: a.b["c"]), function
# arguments, then `=`, `:=` or `contains`; generated bodies start with a __local var instead.
_RULE_HEAD = re.compile(r'^(?:default\s+)?(?!__local)(?P<name>[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*|\[[^\]]*\])*)'
                        r'(?:\([^)]*\))?\s+(?:=|:=|contains)\s')


def lineage(events: Sequence[Event], mode: str) -> list[Event]:
    """The events ``opa eval --explain MODE`` shows (see the module docstring)."""
    if mode == "debug":
        return list(events)
    if mode == "full":
        return [event for event in events if event.get("op") != "Unify"]
    if mode not in ("notes", "fails"):
        raise ValueError(f"explain mode must be one of {', '.join(MODES)}, got {mode!r}")
    wanted = "Note" if mode == "notes" else "Fail"
    entries = _entry_nodes(events)
    result: list[Event] = []
    chain: dict[int, Event] = {}  # query id -> the latest Enter/Redo of its rule or body
    for event in events:
        op = event.get("op")
        if op == wanted:
            path = [event]
            current, previous = chain.get(_qid(event)), None
            while current is not None and current is not previous:
                path.append(current)
                previous, current = current, chain.get(_pid(current))
            result.extend(reversed(path))
            chain = {}
        if op == "Enter" or (op == "Redo" and event.get("node") == entries.get(_qid(event))):
            chain[_qid(event)] = event
    return result


def pretty(events: Sequence[Event], packages: Mapping[str, str] | None = None) -> list[str]:
    """``opa eval --explain``'s lines for ``events``; ``packages`` (file -> package) turns rule
    texts into rule paths (``data.envoy.authz.allow``) as OPA prints them."""
    entries = _entry_nodes(events)
    depths: dict[int, int] = {}
    rows: list[tuple[str, str]] = []
    for event in events:
        qid, op = _qid(event), event.get("op", "")
        depth = depths.get(qid) or depths.setdefault(qid, depths.get(_pid(event), 0) + 1)
        node = str(event.get("node", ""))
        whole = op == "Enter" or (op == "Redo" and node == entries.get(qid))  # a rule or body, not an expression
        bars = "| " * max((depth if whole else depth + 1) - 1, 0)
        if op == "Note":
            text = f"{bars}Note {json.dumps(str(event.get('message', '')), ensure_ascii=False)}"
        else:
            text = f"{bars}{op} {rule_path(event, packages) or node}"
            if event.get("message"):
                text += f" {event['message']}"
        rows.append((short_location(event), text))
    width = max((len(location) for location, _ in rows), default=0) + 1
    return [f"{location.ljust(width)} {text}" for location, text in rows]


def packages_of(modules: Mapping[str, str]) -> dict[str, str]:
    """file name -> package (``envoy.authz``), for ``pretty`` and ``summarize``."""
    found = {}
    for name, source in modules.items():
        match = _PACKAGE.search(source)
        if match:
            found[name] = match.group(1)
    return found


def rule_path(event: Event, packages: Mapping[str, str] | None) -> str:
    """``data.<package>.<rule>`` when the event's node is a rule of a known module, else ""."""
    node = str(event.get("node", ""))
    match = _RULE_HEAD.match(node)
    if match is None or not (node.startswith("default ") or " if {" in node):
        return ""
    file, _ = _split_location(event)
    package = (packages or {}).get(file) if file else None
    name = match.group("name")
    return f"data.{package}.{name}" if package else name


def short_location(event: Event) -> str:
    file, row = _split_location(event)
    return f"{file}:{row}" if file else "query:1"


@dataclass
class RuleOutcome:
    """One rule definition (a rule's body at one location) over an evaluation."""

    rule: str
    location: str
    default: bool = False
    entered: int = 0
    succeeded: int = 0
    failed_at: list[dict[str, str]] = field(default_factory=list)  # where evaluations of it stopped

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"rule": self.rule, "location": self.location, "entered": self.entered,
                                    "succeeded": self.succeeded}
        if self.default:
            document["default"] = True
        if self.failed_at and not self.succeeded:
            document["failed_at"] = self.failed_at
        return document


def summarize(events: Sequence[Event], *, defined: bool, modules: Mapping[str, str] | None = None,
              packages: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Which rules were evaluated and why the result came out (see the module docstring)."""
    modules = modules or {}
    packages = packages if packages is not None else packages_of(modules)
    outcomes: dict[tuple[str, str], RuleOutcome] = {}
    running: dict[int, RuleOutcome] = {}  # query id -> the rule it evaluates
    last_fail: dict[int, Event] = {}
    top: list[RuleOutcome] = []
    indexed_out = False  # OPA's rule index left every non-default rule of the query out
    for event in events:
        op, qid = event.get("op"), _qid(event)
        if op == "Index" and qid == 0 and str(event.get("message", "")).startswith("(matched 0 rules"):
            indexed_out = True
        elif op == "Enter":
            path = rule_path(event, packages)
            if not path:
                continue
            key = (path, short_location(event))
            outcome = outcomes.get(key)
            if outcome is None:
                outcome = outcomes[key] = RuleOutcome(path, key[1], str(event.get("node", "")).startswith("default "))
                if _pid(event) == 0 and qid != 0:
                    top.append(outcome)
            outcome.entered += 1
            running[qid] = outcome
            last_fail.pop(qid, None)
        elif op == "Fail" and qid in running:
            last_fail[qid] = event
        elif op == "Exit" and qid in running and rule_path(event, packages):
            running[qid].succeeded += 1
            last_fail.pop(qid, None)
    for qid, event in last_fail.items():
        outcome = running[qid]
        if len(outcome.failed_at) < MAX_FAILURES_PER_RULE:
            stop = {"expression": str(event.get("node", "")), "location": short_location(event)}
            source = _source_line(event, modules)
            if source:
                stop["source"] = source
            if stop not in outcome.failed_at:
                outcome.failed_at.append(stop)
    decided = [o for o in top if o.succeeded]
    return {
        "defined": defined,
        "because": _because(defined, decided, top, indexed_out),
        "decided_by": [{"rule": o.rule, "location": o.location, **({"default": True} if o.default else {})}
                       for o in decided],
        "rules": [o.to_json() for o in outcomes.values()],
    }


_INDEXED_OUT = "no rule body was tried: the input matches none of their indexed conditions (OPA's rule index)"


def _because(defined: bool, decided: list[RuleOutcome], top: list[RuleOutcome], indexed_out: bool) -> str:
    failed = [o for o in top if not o.succeeded]
    stops = "; ".join(f"{o.rule} ({o.location}) stopped at {o.failed_at[0]['location']}: "
                      f"{o.failed_at[0].get('source') or o.failed_at[0]['expression']}"
                      for o in failed if o.failed_at)
    if indexed_out and not failed:
        stops = _INDEXED_OUT
    if not defined:
        if not top:
            return f"undefined: {_INDEXED_OUT}" if indexed_out else "undefined: no rule defines the queried document"
        return "undefined: no rule succeeded" + (f" ({stops})" if stops else "")
    if not decided:
        return "defined without a rule body (a value from data or the query itself)"
    names = ", ".join(f"{o.rule} ({o.location})" for o in decided)
    if all(o.default for o in decided):
        return f"the default applied: {names}" + (f"; no other rule succeeded ({stops})" if stops else "")
    return f"decided by {names}"


@dataclass(frozen=True)
class Explanation:
    """An evaluation explained in one mode: what the audit log records and the CLI prints."""

    mode: str
    summary: Mapping[str, Any]
    events: Sequence[Event]  # after ``lineage``
    lines: Sequence[str]  # ``pretty(events)``
    omitted: int = 0  # events over ``max_events``, left out

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"mode": self.mode, **self.summary, "trace": list(self.lines)}
        if self.omitted:
            document["trace_omitted"] = self.omitted
        return document


def explain(events: Sequence[Event], mode: str, *, defined: bool, modules: Mapping[str, str] | None = None,
            max_events: int | None = None) -> Explanation:
    """``events`` (a ``Traced``'s) explained in ``mode``. ``locals`` are never copied; ``Unify``
    events only in ``debug`` (see the module docstring)."""
    modules = modules or {}
    packages = packages_of(modules)
    kept = [_without_locals(event) for event in lineage(events, mode)]
    omitted = 0
    if max_events is not None and len(kept) > max_events:
        omitted, kept = len(kept) - max_events, kept[:max_events]
    summary = summarize(events, defined=defined, modules=modules, packages=packages)
    return Explanation(mode, summary, kept, pretty(kept, packages), omitted)


def _without_locals(event: Event) -> Event:
    return {key: value for key, value in event.items() if key != "locals"} if "locals" in event else event


def _entry_nodes(events: Iterable[Event]) -> dict[int, str]:
    """query id -> the node its Enter event named (a rule or a body)."""
    entries: dict[int, str] = {}
    for event in events:
        if event.get("op") == "Enter":
            entries.setdefault(_qid(event), str(event.get("node", "")))
    return entries


def _split_location(event: Event) -> tuple[str, int]:
    match = _FILE_LOCATION.match(str(event.get("location", "")))
    if match is None:
        return "", 0
    return match.group("file"), int(match.group("row"))


def _source_line(event: Event, modules: Mapping[str, str]) -> str:
    file, row = _split_location(event)
    source = modules.get(file) if file else None
    if not source or row < 1:
        return ""
    lines = source.splitlines()
    return lines[row - 1].strip() if row <= len(lines) else ""


def _qid(event: Event) -> int:
    return int(event.get("query_id", 0) or 0)


def _pid(event: Event) -> int:
    return int(event.get("parent_id", 0) or 0)


__all__ = ["MODES", "Explanation", "RuleOutcome", "explain", "lineage", "packages_of", "pretty", "rule_path",
           "summarize"]
