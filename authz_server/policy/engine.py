"""The Rego engine: OPA itself (v1.20), in process, through ``opa-golib-python-bindings``.

The one seam between authz-server and its engine; nothing else imports the bindings.

* ``CompiledPolicy.compile(policy_set, query)`` parses and compiles a set (errors name
  ``file:line``) and keeps what every evaluator needs.
* ``Evaluator``: one OPA engine holding the compiled set. ``evaluate(input_json)`` gives the
  query's value (or ``UNDEFINED``); ``evaluate_many(inputs)`` the values for several inputs in
  one engine call; ``query(text, input_json)`` gives a query's full result set, as ``opa eval``
  prints it. ``evaluate_traced`` and ``query_traced`` do the same with
  OPA's evaluation trace recorded (a ``Traced``: what ``policy.explain`` reads). An OPA
  engine serializes its own calls, so each thread owns its evaluator (``policy.pool``).
* Built-in errors follow OPA's default: the expression is undefined, not an error, unless
  ``strict`` (``strict_builtin_errors``). The bindings always evaluate strictly; see
  ``policy.nonstrict`` for how the default is kept.

The input is handed over as the JSON bytes the caller already made (the same bytes key the
decision cache), and the raw result set is read, rather than the bindings' ``eval_document``,
which would encode the input again and keep only part of the result.

Edges of the embedded engine: an evaluation cannot be cancelled (a runaway keeps its thread:
the pool answers at the deadline and replaces the thread), and it carries the Go runtime,
which must not be loaded in a process that forks afterwards: every engine is made in the
process that uses it (``serve`` starts its workers with exec, never fork), and an engine
found in a forked child refuses to run.
"""

from __future__ import annotations

import ctypes
import functools
import json
import json.encoder
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

# Go reads GOGC when the runtime starts, at the first engine. An evaluation allocates a lot of
# short-lived values (data read from the store becomes AST terms on every read); collecting at
# 4x the live heap instead of 2x costs a few MB and takes about a fifth off each evaluation.
os.environ.setdefault("GOGC", "400")

import orjson  # noqa: E402
from opa_bindings import OpaEngine, OpaError  # noqa: E402  (after GOGC)

from ..errors import PolicyError, RequestError  # noqa: E402
from . import nonstrict  # noqa: E402
from .source import PolicySet  # noqa: E402

log = logging.getLogger("authz_server.policy")
prints = logging.getLogger("authz_server.policy.print")


class _Undefined:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Any = _Undefined()

_QUERY_PATH = re.compile(r"^data(\.[A-Za-z_][A-Za-z0-9_]*|\[\"[^\"]+\"\])+$")
_ENGINE_PID = os.getpid()


def validate_query(query: str) -> str:
    """Accept a data reference such as ``data.envoy.authz.allow``."""
    if not _QUERY_PATH.match(query):
        raise PolicyError(f"query must be a data reference like data.envoy.authz.allow, got {query!r}",
                          code="policy_query_invalid")
    return query


def _input_encoder() -> Callable[[Any], str]:
    """``json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))``, the
    very same text, with json's C encoder made once rather than on every call (``dumps`` builds
    a ``JSONEncoder`` and its C encoder per call: 10 µs an input of the tutorial policy, against
    5). Without the C accelerator, ``dumps`` itself. (orjson would take 0.5 µs but writes some
    floats differently, ``1.5e-05`` as ``0.000015``, and NaN as ``null``: not the same input.)"""
    make = getattr(json.encoder, "c_make_encoder", None)
    encode_string = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or encode_string is None:
        return functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan);
    # no markers: a document is a tree (a cycle would end in RecursionError, a bad_request as well)
    chunks = make(None, json.JSONEncoder().default, encode_string, None, ":", ",", False, False, False)
    return lambda document: "".join(chunks(document, 0))


_encode = _input_encoder()


def encode_input(document: Any) -> bytes:
    """The input as the engine takes it: UTF-8 JSON. What JSON cannot carry (a lone surrogate,
    NaN, a non-string key) is the request's fault: ``bad_request``."""
    try:
        return _encode(document).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise RequestError(f"the request cannot be given to the policy: {exc}", code="bad_request") from None


def format_opa_error(message: str) -> str:
    """OPA's error text on one line: the count line and the source excerpts dropped."""
    lines = []
    for line in message.splitlines():
        if not line.strip() or line.startswith(("\t", " ")):
            continue  # the excerpt and caret OPA prints under a compile error
        line = re.sub(r"^bundle activation failed:\s*", "", line.strip())
        lines.append(re.sub(r"^\d+ errors? occurred:\s*", "", line).strip())
    return "; ".join(dict.fromkeys(line for line in lines if line)) or message.strip()[:500]


def _policy_error(exc: OpaError, *, during: str) -> PolicyError:
    text = format_opa_error(exc.message)
    if exc.code in ("parse_error", "prepare_error", "compile_error"):
        return PolicyError(text, code="policy_compile_error")
    if exc.code == "merge_conflict":
        return PolicyError(f"data does not merge: {text}", code="policy_data_invalid")
    if exc.code == "panic":
        return PolicyError(f"the OPA engine panicked {during}: {text}", code="policy_engine_panic")
    return PolicyError(text, code="policy_eval_error")


def reserve_processors(threads: int) -> None:
    """Tell the Go runtime how many threads will evaluate (GOMAXPROCS), before it starts.

    Every evaluation enters Go from one of the pool's threads and needs a Go processor (P)
    while it runs; more Ps than evaluating threads only spin looking for work (measured:
    a fifth more CPU per request under load). Set before the first engine loads; a GOMAXPROCS
    the operator set wins."""
    os.environ.setdefault("GOMAXPROCS", str(max(1, threads)))


def new_engine() -> OpaEngine:
    if os.getpid() != _ENGINE_PID:
        raise PolicyError("the OPA engine cannot run in a process forked after it was loaded (start it with exec)",
                          code="policy_engine_fork")
    return OpaEngine()


def load_engine(modules: Mapping[str, str], data: Mapping[str, Any], *, builtins: nonstrict.Builtins | None = None,
                on_print: Any = None) -> OpaEngine:
    """An engine holding ``modules`` and ``data``, compiled (compile errors raise here)."""
    engine = new_engine()
    engine.print_handler = on_print or _log_print
    try:
        if builtins is not None:
            builtins.register(engine)
        for name, source in modules.items():
            engine.add_policy(name, source)
        if data:
            engine.add_data(dict(data))
        engine.eval_query("true")  # compiles every module, evaluates none of them
    except OpaError as exc:
        engine.close()
        raise _policy_error(exc, during="while compiling") from None
    return engine


def _log_print(message: str, location: str) -> None:
    prints.debug("%s: %s", location, message)


@dataclass(frozen=True, slots=True)
class Traced:
    """A result set and the engine's trace of the evaluation that gave it.

    ``events`` are OPA's trace events in evaluation order, as the bindings report them:
    ``{"op", "query_id", "parent_id", "location", "node", "message"}`` (``op`` one of Enter,
    Eval, Unify, Index, Exit, Redo, Fail, Note; ``node`` the rule, body or expression as text,
    with values plugged in where OPA plugs them: they can hold input values)."""

    result: list[dict[str, Any]]
    events: list[dict[str, Any]]

    @property
    def value(self) -> Any:
        """The first expression's value, as ``Evaluator.evaluate`` gives it (or ``UNDEFINED``)."""
        return self.result[0]["expressions"][0]["value"] if self.result else UNDEFINED


@dataclass
class CompiledPolicy:
    """A policy set compiled for one query; ``new_evaluator`` makes an engine per thread."""

    policy_set: PolicySet
    query: str
    strict: bool = False  # strict_builtin_errors
    modules: Mapping[str, str] = field(default_factory=dict)  # empty: the set's serving modules
    sites: nonstrict.CallSites = field(default_factory=nonstrict.CallSites)

    def __post_init__(self) -> None:
        if not self.modules:
            self.modules = self.policy_set.serving_modules

    @classmethod
    def compile(cls, policy_set: PolicySet, query: str, *, strict: bool = False,
                modules: Mapping[str, str] | None = None) -> "CompiledPolicy":
        """``modules`` defaults to the set's serving modules (tests use all of them)."""
        compiled = cls(policy_set, validate_query(query), strict,
                       dict(modules) if modules is not None else policy_set.serving_modules)
        compiled.new_evaluator().close()  # compile errors surface now, not on the first request
        return compiled

    def new_evaluator(self) -> "Evaluator":
        return Evaluator(self)


class Evaluator:
    """One OPA engine with the compiled set; call from one thread at a time."""

    def __init__(self, compiled: CompiledPolicy, *, on_print: Any = None) -> None:
        self.compiled = compiled
        self._on_print = on_print
        self._engine = load_engine(compiled.modules, compiled.policy_set.data, on_print=on_print)
        self._query = compiled.query.encode()
        # Every input of a batch in turn, as OPA's own tests replace input (`with input as`): the
        # engine call's fixed cost and the base documents it reads (data turned into AST values
        # on every read) are paid once for the batch. Keys are the inputs' positions.
        self._many_query = f"{{i: r | some i, x in input; r := {compiled.query} with input as x}}".encode()
        self._fallback: tuple[int, OpaEngine, nonstrict.Builtins] | None = None  # (sites version, engine, helper)
        self._lock = threading.Lock()  # guards against two threads sharing one evaluator by mistake

    def evaluate(self, input_json: bytes) -> Any:
        """The query's value with ``input_json`` as ``input``, or ``UNDEFINED``."""
        result = self._result_set(self._query, input_json)
        if not result:
            return UNDEFINED
        return result[0]["expressions"][0]["value"]

    def evaluate_many(self, inputs: Sequence[bytes]) -> list[Any] | None:
        """The query's value (or ``UNDEFINED``) for each of ``inputs``, in one engine call; None
        when that call failed, so that the caller evaluates each on its own and an error (a
        built-in error, conflicting values) stays with the input that raised it. Measured on the
        route table: 105-146 µs of CPU per decision in batches of 4-32, against 259 one by one."""
        self._claim()
        try:
            result = _run(self._engine, self._many_query, b"[" + b",".join(inputs) + b"]")
        except OpaError:
            return None
        finally:
            self._lock.release()
        values = result[0]["expressions"][0]["value"] if result else {}
        return [values.get(str(position), UNDEFINED) for position in range(len(inputs))]

    def query(self, text: str, input_json: bytes | None) -> list[dict[str, Any]]:
        """A query's full result set (``[]`` when undefined), as ``opa eval --format json`` shows it."""
        return self._result_set(_encode_query(text), input_json, query_text=text)

    def evaluate_traced(self, input_json: bytes) -> Traced:
        """``evaluate`` with OPA's trace recorded (slower: for explanations, never the hot path)."""
        events: list[dict[str, Any]] = []
        return Traced(self._result_set(self._query, input_json, events=events), events)

    def query_traced(self, text: str, input_json: bytes | None) -> Traced:
        """``query`` with OPA's trace recorded, as ``opa eval --explain`` records it."""
        events: list[dict[str, Any]] = []
        return Traced(self._result_set(_encode_query(text), input_json, query_text=text, events=events), events)

    def _result_set(self, query: bytes, input_json: bytes | None, *, query_text: str | None = None,
                    events: list[dict[str, Any]] | None = None) -> list[Any]:
        self._claim()
        try:
            try:
                return _run(self._engine, query, input_json, events)
            except OpaError as exc:
                site = None if self.compiled.strict else nonstrict.builtin_error_site(exc)
                if site is None:
                    raise _policy_error(exc, during="while evaluating") from None
            return self._nonstrict(query, input_json, site, query_text, events)
        finally:
            self._lock.release()

    def _claim(self) -> None:
        """Take the evaluator for one call (the caller releases ``_lock``); two threads sharing
        one is a bug, told at once rather than serialized."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("an Evaluator is used by one thread at a time")

    def _nonstrict(self, query: bytes, input_json: bytes | None, site: nonstrict.Site,
                   query_text: str | None, events: list[dict[str, Any]] | None) -> list[Any]:
        """OPA's default for a built-in error: that expression is undefined. The call sites
        that ever failed are wrapped (``policy.nonstrict``) in a second engine, and the
        evaluation runs there; a new failing site is added and the evaluation tried again."""
        sites = self.compiled.sites
        for _ in range(nonstrict.MAX_SITES):
            if not sites.add(site):
                raise PolicyError(f"too many built-in call sites failed ({nonstrict.MAX_SITES}); the last: "
                                  f"{site.describe()}", code="policy_eval_error")
            engine = self._fallback_engine(sites)
            wrapped_query = nonstrict.rewrite_query(query_text, sites) if query_text is not None else None
            try:
                return _run(engine, wrapped_query.encode() if wrapped_query is not None else query, input_json, events)
            except OpaError as exc:
                next_site = nonstrict.builtin_error_site(exc)
                if next_site is None or next_site in sites:
                    raise _policy_error(exc, during="while evaluating") from None
                site = next_site
        raise PolicyError("built-in errors kept appearing", code="policy_eval_error")

    def _fallback_engine(self, sites: nonstrict.CallSites) -> OpaEngine:
        version, modules = sites.snapshot(self.compiled.modules)
        if self._fallback is not None and self._fallback[0] == version:
            return self._fallback[1]
        self.close_fallback()
        helper = nonstrict.Builtins()
        engine = load_engine(modules, self.compiled.policy_set.data, builtins=helper, on_print=self._on_print)
        self._fallback = (version, engine, helper)
        return engine

    def close_fallback(self) -> None:
        if self._fallback is not None:
            self._fallback[1].close()
            self._fallback[2].close()
            self._fallback = None

    def close(self) -> None:
        self.close_fallback()
        self._engine.close()


def _encode_query(text: str) -> bytes:
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PolicyError(f"the query is not valid UTF-8: {exc}", code="policy_query_invalid") from None
    if b"\0" in encoded:
        raise PolicyError("the query contains a NUL character", code="policy_query_invalid")
    return encoded


def _run(engine: OpaEngine, query: bytes, input_json: bytes | None,
         events: list[dict[str, Any]] | None = None) -> list[Any]:
    """One evaluation through the bindings' C entry point, with JSON we already made; with
    ``events``, the engine records its trace and the events are added to that list."""
    with engine._eval_lock:
        handle = engine._handle  # as the bindings' own ``_call``, with the envelope read by ``_envelope``
        if handle is None:
            raise OpaError("closed", "engine has been closed")
        pointer = engine._lib.OpaEvalQuery(handle, query, input_json or b"", 0, 0 if events is None else 1)
        if not pointer:
            raise OpaError("internal", "native call returned NULL")
        try:
            raw = ctypes.string_at(pointer)
        finally:
            engine._lib.OpaFreeString(pointer)
    envelope = _envelope(raw)
    error = envelope.get("error")
    if error is not None:
        raise OpaError(error.get("code", "unknown"), error.get("message", ""))
    printed = envelope.get("prints")
    if printed:
        for entry in printed:
            engine.print_handler(entry.get("message", ""), entry.get("location", ""))
    if events is not None:
        events.extend(envelope.get("trace") or ())
    return envelope.get("result") or []


# A run of 19 digits could be an integer past 64 bits, which orjson reads as a float (json keeps it whole).
_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def _envelope(raw: bytes) -> dict[str, Any]:
    """The bridge's JSON answer, read as ``json.loads`` reads it: by orjson (1.4 µs an answer
    against 7.9) unless it holds what orjson reads otherwise or not at all (a long integer;
    NaN, an overflowing number, a lone surrogate: orjson refuses those)."""
    if _LONG_NUMBER.search(raw) is None:
        try:
            envelope: dict[str, Any] = orjson.loads(raw)
            return envelope
        except orjson.JSONDecodeError:
            pass
    envelope = json.loads(raw)
    return envelope
