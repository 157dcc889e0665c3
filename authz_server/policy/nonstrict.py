"""OPA's default for built-in errors, on an engine that only evaluates strictly.

OPA evaluates the same way in both modes: a built-in that fails (``json.unmarshal`` of text
that is not JSON, ``count(5)``) makes its expression undefined, and evaluation goes on. Only
at the end does strict mode (``strict_builtin_errors``) turn a recorded failure into an error
for the whole query; by default the results stand. The embedded engine
(``opa-golib-python-bindings``) always evaluates strictly, and its error names the failing
built-in and where it was called (``authz.rego:4: eval_builtin_error: json.unmarshal: ...``).

So a failure is kept as the site it came from (file, line, built-in) and the evaluation runs
again on a second engine in which the calls of that built-in on that line go through a
wrapper: ``json.unmarshal(x)`` becomes ``data.__authz_nonstrict.call_json__unmarshal(x)``, a
Rego function that asks a Python built-in (``__authz_builtin_call``) to run the real one on a
clean engine and hand back ``["value", v]``, ``["set", [...]]`` or ``[]`` for a failure; the
function is undefined on ``[]``. A wrapped call cannot fail, so the strict engine returns the
results OPA's default mode would. A site that fails once stays wrapped for that policy version;
the first engine keeps answering every evaluation that fails nowhere, at full speed.

Limits, all outside what authorization policies do: a set nested inside an argument reaches
the real built-in as an array (top-level set arguments are restored), ``with`` replacing a
built-in does not reach a wrapped call site, and a line holding the same built-in twice wraps
both calls (they behave the same unless one of them fails).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from opa_bindings import OpaEngine, OpaError

MAX_SITES = 64
PACKAGE = "__authz_nonstrict"
BUILTIN = "__authz_builtin_call"

_IN_MODULE = re.compile(r"^(?P<file>.+?):(?P<row>\d+): (?:eval_builtin_error|eval_type_error): (?P<name>[A-Za-z_][\w.]*): ")
_IN_QUERY = re.compile(r"^(?P<expr>.+?): (?:eval_builtin_error|eval_type_error): (?P<name>[A-Za-z_][\w.]*): ", re.S)


@dataclass(frozen=True, slots=True)
class Site:
    """Where a built-in failed: a module's line, or (``file`` empty) the query itself."""

    file: str
    row: int
    name: str

    def describe(self) -> str:
        return f"{self.name} at {self.file}:{self.row}" if self.file else f"{self.name} in the query"


def builtin_error_site(exc: OpaError) -> Site | None:
    """The site of a built-in's failure, or None for any other error (conflicts, panics...)."""
    if exc.code != "eval_error":
        return None
    match = _IN_MODULE.match(exc.message)
    if match is not None and not match.group("file").startswith(("{", "[", "(")):
        return Site(match.group("file"), int(match.group("row")), match.group("name"))
    match = _IN_QUERY.match(exc.message)
    if match is not None:
        return Site("", 0, match.group("name"))
    return None


@dataclass
class CallSites:
    """The failing sites of one policy version, shared by its evaluators (one per thread)."""

    sites: frozenset[Site] = frozenset()
    arity: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _version: int = 0

    def __contains__(self, site: Site) -> bool:
        return site in self.sites

    def add(self, site: Site) -> bool:
        with self._lock:
            if site in self.sites:
                return True
            if len(self.sites) >= MAX_SITES:
                return False
            if site.name not in self.arity:
                self.arity[site.name] = _arity_of(site.name)
            self.sites = self.sites | {site}
            self._version += 1
            return True

    def snapshot(self, modules: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """(version, the modules with every failing site wrapped, plus the wrappers' module)."""
        with self._lock:
            version, sites, arity = self._version, self.sites, dict(self.arity)
        rewritten = dict(modules)
        for name in {s.file for s in sites if s.file}:
            if name in rewritten:
                rewritten[name] = _wrap_rows(rewritten[name], [s for s in sites if s.file == name])
        rewritten[f"{PACKAGE}.rego"] = _wrappers(sorted({s.name for s in sites}), arity)
        return version, rewritten


def rewrite_query(query: str, sites: CallSites) -> str:
    """The query with the built-ins that failed in it wrapped (``policy eval``)."""
    names = {s.name for s in sites.sites if not s.file}
    return _wrap_names(query, names) if names else query


def _mangle(name: str) -> str:
    return "call_" + name.replace(".", "__")


def _wrap_rows(source: str, sites: list[Site]) -> str:
    lines = source.split("\n")
    for site in sites:
        # The error gives the line where the failing expression starts; the call is usually on
        # it, else on one of the next few (an expression spread over several lines).
        for index in range(site.row - 1, min(site.row + 4, len(lines))):
            changed = _wrap_names(lines[index], {site.name})
            if changed != lines[index]:
                lines[index] = changed
                break
    return "\n".join(lines)


def _wrap_names(text: str, names: set[str]) -> str:
    """Replace ``name(`` by the wrapper's call, outside strings and comments."""
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
                         + r")(\s*\()")
    out, pos = [], 0
    for start, end in _code_spans(text):
        out.append(text[pos:start])
        out.append(pattern.sub(lambda m: f"data.{PACKAGE}.{_mangle(m.group(1))}{m.group(2)}", text[start:end]))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _code_spans(text: str) -> list[tuple[int, int]]:
    """The parts of ``text`` outside string literals and comments."""
    spans, start, i, n = [], 0, 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            spans.append((start, i))
            return spans
        if c in "\"`":
            spans.append((start, i))
            close = i + 1
            while close < n and text[close] != c:
                close += 2 if c == '"' and text[close] == "\\" else 1
            i = start = close + 1
            continue
        i += 1
    spans.append((start, n))
    return [(a, b) for a, b in spans if a < b]


def _wrappers(names: list[str], arity: Mapping[str, int]) -> str:
    lines = [f"package {PACKAGE}", "", "import rego.v1", "",
             'unwrap(r) := v if { r[0] == "value"; v := r[1] }',
             'unwrap(r) := s if { r[0] == "set"; s := {e | some e in r[1]} }', ""]
    for name in names:
        args = [f"a{i}" for i in range(arity[name])]
        types = ", ".join(f"type_name({a})" for a in args)
        lines.append(f'{_mangle(name)}({", ".join(args)}) := unwrap({BUILTIN}({json.dumps(name)}, '
                     f'[{", ".join(args)}], [{types}]))')
    return "\n".join(lines) + "\n"


def _arity_of(name: str) -> int:
    """How many arguments the built-in takes: the count the type checker accepts."""
    engine = OpaEngine()
    try:
        for arity in range(8):
            args = ", ".join(f"input[{i}]" for i in range(arity))
            try:
                engine.eval_query(f"__r := {name}({args})", [None] * arity)
                return arity
            except OpaError as exc:
                if exc.code != "prepare_error":
                    return arity  # it compiled; failing on nulls is expected
        raise OpaError("unknown_builtin", f"{name} is not a built-in this engine knows")
    finally:
        engine.close()


class Builtins:
    """``__authz_builtin_call(name, args, types)``: the real built-in, run on a clean engine."""

    def __init__(self) -> None:
        self._engine: OpaEngine | None = None

    def register(self, engine: OpaEngine) -> None:
        engine.register_function(BUILTIN, self.call, arity=3)

    def call(self, name: str, args: list[Any], types: list[str]) -> list[Any]:
        if self._engine is None:
            self._engine = OpaEngine()
        terms = ", ".join(f"{{__e | some __e in input[{i}]}}" if kind == "set" else f"input[{i}]"
                          for i, kind in enumerate(types))
        try:
            result = self._engine.eval_query(f"__r := {name}({terms}); __t := type_name(__r)", args)
        except OpaError:
            return []  # the failure OPA's default mode turns into an undefined expression
        if not result:
            return []
        return ["set" if result[0]["__t"] == "set" else "value", result[0]["__r"]]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
