"""The Rego engine: regopy (Microsoft rego-cpp), compiled once, queried many times.

A ``CompiledPolicy`` validates a ``PolicySet`` by building its bundle (parse and compile
errors surface here, with file:line). Each ``Evaluator`` owns one interpreter with the
compiled bundle loaded, because an interpreter is not thread-safe. A query that names a
rule by plain identifiers (``data.envoy.authz.allow``) is compiled as a bundle entrypoint
(``envoy/authz/allow``), which evaluates about 35 µs faster than a query; any other reference
is compiled as a query that binds its value (``result := data["a-b"].allow``), because a bare
query whose value is ``false`` comes back undefined.

regopy calls go through ctypes, which releases the GIL, so the ``EvaluatorPool`` can run
them on worker threads: the event loop keeps answering cached decisions while a policy
evaluates, and a policy that runs too long is answered with a deny at the deadline. A
stuck evaluator is replaced by a fresh one (up to a bound) and retired when it finally
returns, so one pathological input cannot starve the pool. Fast, well-behaved policies
graduate to inline evaluation (see ``EvaluatorPool``).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import regopy

from ..errors import PolicyError, RequestError
from .source import PolicySet



class _Undefined:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Any = _Undefined()

log = logging.getLogger("authz_server.policy")

_QUERY_PATH = re.compile(r"^data(\.[A-Za-z_][A-Za-z0-9_]*|\[\"[^\"]+\"\])+$")


def validate_query(query: str) -> str:
    """Accept a data reference such as ``data.envoy.authz.allow``."""
    if not _QUERY_PATH.match(query):
        raise PolicyError(f"query must be a data reference like data.envoy.authz.allow, got {query!r}",
                          code="policy_query_invalid")
    return query


_SPAN = re.compile(r"\|\d+\|\d+")


def format_rego_error(text: str, modules: dict[str, str] | None = None) -> str:
    """Turn rego-cpp's error s-expression into ``file:line:col: message`` lines."""
    messages = []
    for match in re.finditer(r"\(error (\d+):", text):
        pos = match.end()
        length = int(match.group(1))
        location = text[pos:pos + length]
        # The length prefix covers the file name only; the byte offset and length follow it
        # as "|offset|length" (rego-cpp 1.x: "(error 10:authz.rego|59|2").
        span = _SPAN.match(text, pos + length)
        if span is not None and "|" not in location:
            location += span.group(0)
        where = location
        parts = location.split("|")
        if len(parts) == 3 and modules and parts[0] in modules and parts[1].isdigit():
            source = modules[parts[0]].encode()[: int(parts[1])].decode(errors="replace")
            line = source.count("\n") + 1
            col = len(source) - (source.rfind("\n") + 1) + 1
            where = f"{parts[0]}:{line}:{col}"
        elif len(parts) == 3:
            where = parts[0]  # a file we do not have, or none (a query): no line to give
        msg = re.compile(r"\(errormsg (\d+):").search(text, pos)
        message = text[msg.end(): msg.end() + int(msg.group(1))] if msg else "error"
        messages.append(f"{where}: {message}" if where else message)
    if not messages:  # evaluation errors come as "(error (errormsg N:...) ...)", without a location
        messages = [text[m.end(): m.end() + int(m.group(1))] for m in re.finditer(r"\(errormsg (\d+):", text)]
    return "; ".join(dict.fromkeys(messages)) or text.strip()[:500]


def _output_error(output: regopy.Output) -> str:
    # str(output) of a failed query can crash the process; the error node's JSON is safe.
    try:
        node = output.node()
        return format_rego_error("\n".join(node.at(i).json() for i in range(len(node))))
    except Exception:  # the message is a courtesy; the deny does not depend on it
        return "policy evaluation failed"


def load_interpreter(modules: Mapping[str, str], data: Mapping[str, Any]) -> regopy.Interpreter:
    """A quiet interpreter holding ``modules`` and ``data``; raises ``regopy.RegoError``."""
    interpreter = regopy.Interpreter()
    interpreter.log_level = regopy.LogLevel.NONE
    for name, source in modules.items():
        interpreter.add_module(name, source)
    if data:
        # Non-ASCII kept as UTF-8: rego-cpp compares strings by their escaped text, so
        # "\u00e9" in data would not equal "é" in the input.
        interpreter.add_data_json(json.dumps(data, ensure_ascii=False))
    return interpreter


@dataclass(frozen=True)
class CompiledPolicy:
    policy_set: PolicySet
    query: str

    @classmethod
    def compile(cls, policy_set: PolicySet, query: str) -> "CompiledPolicy":
        compiled = cls(policy_set, validate_query(query))
        compiled.new_evaluator()  # compile errors surface now, not on the first request
        return compiled

    def new_interpreter(self) -> regopy.Interpreter:
        try:
            return load_interpreter(self.policy_set.serving_modules, self.policy_set.data)
        except regopy.RegoError as exc:
            raise PolicyError(format_rego_error(str(exc), dict(self.policy_set.modules)),
                              code="policy_compile_error") from None

    def new_evaluator(self, query: str | None = None) -> "Evaluator":
        query = query or self.query
        interpreter = self.new_interpreter()
        entrypoint = _entrypoint(query)
        try:
            if entrypoint is not None:
                bundle = interpreter.build(None, [entrypoint])
            else:
                bundle = interpreter.build(f"result := {query}")
        except regopy.RegoError as exc:
            raise PolicyError(format_rego_error(str(exc), dict(self.policy_set.modules)),
                              code="policy_compile_error") from None
        if not bundle.ok():
            raise PolicyError("policy bundle failed to build", code="policy_compile_error")
        return Evaluator(interpreter, bundle, entrypoint)


_RULE_PATH = re.compile(r"^data((?:\.[A-Za-z_][A-Za-z0-9_]*)+)$")


def _entrypoint(query: str) -> str | None:
    match = _RULE_PATH.match(query)
    return match.group(1)[1:].replace(".", "/") if match else None


def _input_builder() -> Callable[[Any], regopy.Input]:
    """Give a JSON-shaped document to the engine through rego-cpp's input API.

    regopy's own converter walks the value with ``isinstance`` chains and copies every
    string into a fresh buffer; this one dispatches on the exact type and passes bytes
    straight through: about 40% less time for a typical ext_authz input. Strings with a NUL
    byte are refused, since C would silently cut them short.

    rego-cpp keeps a string as the text between the quotes of its JSON form: a value given
    through this API must be JSON-escaped, or a ``"`` or ``\\`` in a header changes what the
    policy compares (``a\\nb`` would equal ``"a\\nb"`` in Rego, a newline) and breaks the
    engine's output. Only strings that hold such a character pay for the escaping.
    """
    lib = regopy.rego_shared.rego
    new_input = lib.regoNewInput
    put_str, put_int, put_float = lib.regoInputString, lib.regoInputInt, lib.regoInputFloat
    put_bool, put_null = lib.regoInputBoolean, lib.regoInputNull
    make_item, make_object, make_array = lib.regoInputObjectItem, lib.regoInputObject, lib.regoInputArray
    needs_escape = re.compile(rb'["\\\x00-\x1f]').search

    def put_text(handle: Any, text: str) -> int:
        raw = text.encode("utf-8")
        if needs_escape(raw) is not None:
            if b"\x00" in raw:
                raise ValueError("a string in the input contains a NUL byte")
            raw = json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8")
        return put_str(handle, raw)

    def add(handle: Any, value: Any) -> int:
        kind = type(value)
        if kind is str:
            return put_text(handle, value)
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str:
                    raise ValueError(f"object key {key!r} is not a string")
                if put_text(handle, key) or add(handle, item) or make_item(handle):
                    return 1
            return make_object(handle, len(value))
        if kind is list or kind is tuple:
            for item in value:
                if add(handle, item):
                    return 1
            return make_array(handle, len(value))
        if kind is bool:
            return put_bool(handle, value)
        if kind is int:
            if not -(2**63) <= value < 2**63:
                raise ValueError(f"integer {value} does not fit the engine")
            return put_int(handle, value)
        if kind is float:
            return put_float(handle, value)
        if value is None:
            return put_null(handle)
        raise ValueError(f"cannot give a {kind.__name__} to the policy")

    def build(document: Any) -> regopy.Input:
        handle = new_input()
        wrapper = regopy.Input.__new__(regopy.Input)
        wrapper._impl = handle  # owned from here on: freed by Input.__del__
        if add(handle, document):
            raise ValueError("the engine refused the input document")
        return wrapper

    return build


engine_input = _input_builder()


_rego = regopy.rego_shared.rego


class Evaluator:
    """One interpreter with the compiled bundle; call from one thread at a time."""

    __slots__ = ("_interpreter", "_bundle", "_entrypoint")

    def __init__(self, interpreter: regopy.Interpreter, bundle: regopy.Bundle, entrypoint: str | None) -> None:
        self._interpreter = interpreter
        self._bundle = bundle
        self._entrypoint = entrypoint.encode() if entrypoint is not None else None

    def evaluate(self, document: Any) -> Any:
        """The query's value for ``document`` as ``input``, or ``UNDEFINED``."""
        interpreter = self._interpreter
        try:
            interpreter.set_input(engine_input(document))
        except regopy.RegoError as exc:
            raise PolicyError(format_rego_error(str(exc)), code="policy_eval_error") from None
        except (TypeError, ValueError, OverflowError, ctypes.ArgumentError) as exc:  # not JSON-shaped
            raise RequestError(f"the request cannot be given to the policy: {exc}", code="bad_request") from None
        # The output is read once, as JSON, straight through the C API: regopy's Output reads
        # it twice and wraps every result in objects we do not use.
        if self._entrypoint is not None:
            impl = _rego.regoBundleQueryEntrypoint(interpreter._impl, self._bundle._impl, self._entrypoint)
        else:
            impl = _rego.regoBundleQuery(interpreter._impl, self._bundle._impl)
        if not impl:
            raise PolicyError(format_rego_error(regopy.rego_shared.rego_get_error(interpreter._impl)),
                              code="policy_eval_error")
        output = regopy.Output.__new__(regopy.Output)
        output._impl = impl  # owned from here on: freed by Output.__del__
        if not _rego.regoOutputOk(impl):
            raise PolicyError(_output_error(output), code="policy_eval_error")
        text = regopy.rego_shared.rego_output_string(impl)
        if text == "undefined":
            return UNDEFINED
        try:
            value = json.loads(text)
        except ValueError:  # rego-cpp reports some failures as an error tree in the output
            raise PolicyError(f"the engine returned no readable result: {text[:200]}",
                              code="policy_eval_error") from None
        if self._entrypoint is not None:
            return value["expressions"][0]
        for result in value if isinstance(value, list) else (value,):
            bindings = result.get("bindings", {})
            if "result" in bindings:
                return bindings["result"]
        return UNDEFINED


ISOLATION_MODES = ("adaptive", "thread", "inline")
PROBATION = 200  # evaluations a policy version runs on threads before it may run inline


class EvaluatorPool:
    """Evaluate with a deadline; see the module docstring.

    Handing an evaluation to a worker thread and back costs two cross-thread wake-ups,
    about 200 µs on a small VM, half again the policy itself. So in ``adaptive`` mode a
    policy version starts on worker threads (the deadline enforced) and, once its first
    ``probation`` evaluations all finished within a tenth of the deadline, runs inline on
    the event loop. An inline evaluation that overruns the deadline is answered with a
    deny and sends this version back to worker threads for good. ``thread`` never runs
    inline (a pathological input can then never stall the loop); ``inline`` never uses
    threads (no deadline: for tools and benchmarks).
    """

    def __init__(self, compiled: CompiledPolicy, *, size: int = 2, spare: int = 4,
                 on_timeout: Callable[[], None] | None = None, isolation: str = "adaptive",
                 probation: int = PROBATION) -> None:
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        self.compiled = compiled
        self._on_timeout = on_timeout
        self._idle: list[Evaluator] = [compiled.new_evaluator() for _ in range(size)]
        self._spare = spare  # replacements allowed for evaluators stuck past their deadline
        self._lock = threading.Lock()
        self._available = asyncio.Semaphore(size)
        self._executor = ThreadPoolExecutor(max_workers=size + spare, thread_name_prefix="rego")
        self.isolation = isolation
        self._probation_left = probation if isolation == "adaptive" else 0
        self.inline = isolation == "inline"
        self._inline_evaluator = compiled.new_evaluator() if isolation != "thread" else None

    def evaluate_now(self, document: Any) -> Any:
        """Synchronous evaluation on the caller's thread (tools and tests: no deadline)."""
        with self._lock:
            evaluator = self._idle.pop() if self._idle else self.compiled.new_evaluator()
        try:
            return evaluator.evaluate(document)
        finally:
            with self._lock:
                self._idle.append(evaluator)

    async def evaluate(self, document: Any, *, timeout: float) -> Any:
        if self.inline and self._inline_evaluator is not None:
            return self._evaluate_inline(document, timeout)
        started = time.perf_counter()
        result = await self._evaluate_threaded(document, timeout)
        if self._probation_left > 0:
            if time.perf_counter() - started > timeout / 10:
                self._probation_left = 0  # too slow to trust inline: stays on threads
                self.isolation = "thread"
            else:
                self._probation_left -= 1
                if self._probation_left == 0:
                    self.inline = True
        return result

    def _evaluate_inline(self, document: Any, timeout: float) -> Any:
        assert self._inline_evaluator is not None
        started = time.perf_counter()
        result = self._inline_evaluator.evaluate(document)
        elapsed = time.perf_counter() - started
        if elapsed > timeout and self.isolation == "adaptive":
            self.inline = False
            self.isolation = "thread"
            log.error("a policy evaluation took %.3fs inline, over the %.3fs deadline: evaluating policy %s on "
                      "worker threads from now on", elapsed, timeout, self.compiled.policy_set.version)
            if self._on_timeout is not None:
                self._on_timeout()
            raise PolicyError(f"policy evaluation took {elapsed:.3f}s, over {timeout:.3f}s", code="policy_timeout")
        return result

    async def _evaluate_threaded(self, document: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._available.acquire(), timeout)
        except TimeoutError:
            raise PolicyError(f"no policy evaluator free within {timeout:.3f}s", code="policy_timeout") from None
        with self._lock:
            evaluator = self._idle.pop()
        future = loop.run_in_executor(self._executor, evaluator.evaluate, document)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if self._on_timeout is not None:
                self._on_timeout()
            self._replace_stuck(future, evaluator)
            raise PolicyError(f"policy evaluation exceeded {timeout:.3f}s", code="policy_timeout") from None
        except BaseException:
            self._release(evaluator)
            raise
        self._release(evaluator)
        return result

    def _release(self, evaluator: Evaluator) -> None:
        with self._lock:
            self._idle.append(evaluator)
        self._available.release()

    def _replace_stuck(self, future: asyncio.Future[Any], evaluator: Evaluator) -> None:
        if self._spare <= 0:
            # No replacement left: the slot comes back when the stuck evaluation ends.
            future.add_done_callback(lambda _f: self._release(evaluator))
            return
        self._spare -= 1
        try:
            replacement = self.compiled.new_evaluator()
        except PolicyError:  # compiled fine before; keep the slot tied to the stuck one
            self._spare += 1
            future.add_done_callback(lambda _f: self._release(evaluator))
            return
        self._release(replacement)

        def retire(_f: asyncio.Future[Any]) -> None:
            self._spare += 1  # the stuck one is dropped; its thread is free again

        future.add_done_callback(retire)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
