"""Decisions → audit records, the fast path (issue 28).

Built by the audit log's build passes, after the answer has gone: a cache hit carries no input document,
so it is built here from the facts. Most of a record repeats, even on traffic that does not (an
id in every path, a query string, users at random): the request's members of the input document
(attributes, ``parsed_*``, ...) are the same for every request of one *shape* (see
``facts.ShapedAttributeSource``: everything but the method, path and headers) but for those
three, what is parsed from the path and body, and the volatile values (request id, port, time,
tracing headers). ``RecordBuilder`` redacts and renders them once per (shape, which volatile
values it has) with a slot for each of those (``_Template``); the changing values are redacted
and rendered per request (``_Changing``, kept per fingerprint from its second sighting on: a
repeated request finds them, traffic that does not repeat keeps nothing; in one C call when the
path is one redaction cannot change, ``redact.render_inert_request``), the volatile ones per
record, once (the request id is the record's ``request_id`` too). A path as Envoy sends most
(``redact._INERT_PATH``) is not scrubbed, nor are the pieces parsed from it: one match shows
that redaction cannot change them. A request whose attributes source cannot tell its shape
takes a template per fingerprint (the volatile values its only slots), as every request did
before shapes; both write the same bytes. ``input.identity`` is kept rendered per identity
fingerprint, ``signals`` and an object ``result`` per rendered value, the members from
``allowed`` to ``spiffe_id`` per verdict and person (``_Verdict``), the strings that repeat per
value, the timestamp's seconds per second. A record is then those fragments joined around the
request's own values, redacted and rendered (orjson); no tree is built. A decision whose policy
saw the whole input takes the same path when that input was built from these very facts (its
attributes are the facts' own), so a record costs the same whether the policy ran or the cache
answered.

The usual record (no explanation, a shape whose template exists, a request without a body and
with an inert path, or one that repeats) is made in C, ``_volatile_cut.record``: the same steps
over the same kept fragments, asking this builder's own methods whenever what it keeps misses,
byte for byte what ``_fast`` writes (tests/unit/test_audit_fast_path.py). ``_fast`` stays the
reference and makes every other record, and all of them where the extension is not built. In
a busy server a record's many small Python steps each found their data gone cold; in C the
build passes spent about a third less a record (docs/benchmarks.md).

What cannot be split (a request read in Envoy's raw-headers form, an input the policy was
given otherwise, a value orjson refuses) takes the straightforward whole path:
``record.build_document``, ``Redactor.redact``, ``render_line``. The fast path must mean
what that path means, record for record: tests/unit/test_audit_fast_path.py.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, TypeVar

import orjson

from ..errors import AuthzError
from ..facts import (Facts, Shape, Volatile, parse_body, parse_path_and_query, request_time, stable_input,
                     with_volatile)
from .record import BUNDLE_NAME, AuditRecord, build_document, who
from .redact import TOKEN_PARAMETERS, Redactor, header_pointer, header_rule, render_inert_request, scrub_text
from .render import render_line

try:
    from .. import _volatile_cut
except ImportError:  # built without a C compiler: the Python path makes every record
    _volatile_cut = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ..decision import Decision

_UNSPLIT = object()  # a request whose input cannot be split (or built): the whole path each time
# attributes, parsed_path, parsed_query, parsed_body, truncated_body, version, identity, signals
# (and source_principal when there is one): build_input's whole document
_WHOLE_INPUT_MEMBERS = 8
# A slot in a rendered template: a string no request can hold (Envoy sends no NUL), checked anyway.
_SLOT = re.compile(rb'"\\u0000\\u0001(\d+)\\u0000"')
_REQUEST_ID, _PORT, _TIME, _HEADERS = 0, 1, 2, 3  # a fingerprint's template: _HEADERS + n, the n-th volatile header
# a shape's template: every header in one slot, then the values that change within a shape
_HEADERS_ALL, _METHOD, _PATH, _PARSED_PATH, _PARSED_QUERY, _PARSED_BODY, _TRUNCATED = 3, 4, 5, 6, 7, 8, 9
_BOOL = {True: b"true", False: b"false"}
_dumps = orjson.dumps
_BUNDLES = b'"bundles":{' + _dumps(BUNDLE_NAME) + b':{"revision":'
_INT64 = 1 << 63
_TRANSPORTS = {transport: b',"transport":' + _dumps(transport) for transport in ("grpc", "http")}


def _kept(rendered: bytes) -> bytes:
    """A copy of orjson's output the size of its text, for what is kept across records.
    orjson writes into a buffer of a kilobyte or so and shrinks it in place; kept, each such
    buffer leaves a hole the next one does not fit in, and the heap grows a page at a time
    (measured: 1.9 µs a kept output, against 0.1 µs copied)."""
    return memoryview(rendered).tobytes()


def _time_json(seconds: int, nanos: int) -> bytes:
    """``request_time``'s object rendered: formatted directly when both are integers (what
    the fronts give), a dict and its rendering less per record."""
    if type(seconds) is not int or type(nanos) is not int:
        return _dumps(request_time((seconds, nanos)))
    if seconds and nanos:
        return b'{"seconds":%d,"nanos":%d}' % (seconds, nanos)
    if seconds:
        return b'{"seconds":%d}' % seconds
    return b'{"nanos":%d}' % nanos if nanos else b"{}"


def _slot(index: int) -> str:
    return f"\x00\x01{index}\x00"


@dataclass(frozen=True, slots=True)
class _Template:
    """The request's members of the input document (attributes, ``parsed_*``, ...), redacted
    and rendered once, with a slot wherever a per-request (volatile) value goes: ``fragments``
    around ``slots`` (which value: request id, port, time, or the n-th volatile header)."""

    fragments: tuple[bytes, ...]
    slots: tuple[int, ...]
    masked: tuple[str, ...]
    erased: tuple[str, ...]
    path_first: bool = False  # a shape's: whether its attributes list the path before the headers
    pattern: bytes = b""  # the fragments joined with a %b for each slot (literal % doubled)


def _slotted(volatile: Volatile, headers: dict[str, str]) -> Volatile:
    """``volatile``'s request id and port as their slots (where it has them), with ``headers``;
    the time is put in by the caller (``with_volatile`` renders it as an object)."""
    return Volatile(request_id=_slot(_REQUEST_ID) if volatile.request_id else "", time_value=None,
                    port=_slot(_PORT) if volatile.port else 0,  # type: ignore[arg-type]
                    headers=headers)


def _spliced(members: dict[str, Any], expected: list[int], masked: tuple[str, ...], erased: tuple[str, ...],
             path_first: bool = False) -> Any:
    """``members`` rendered with their slot markers cut out: a template, or ``_UNSPLIT`` when
    they cannot be rendered or do not hold exactly the ``expected`` slots."""
    try:
        rendered = _dumps(members)
    except (TypeError, orjson.JSONEncodeError):
        return _UNSPLIT
    parts = _SLOT.split(rendered[1:-1])
    slots = tuple(int(index) for index in parts[1::2])
    if sorted(slots) != expected:  # a request holding our slot marker text: never spliced
        return _UNSPLIT
    return _new_template(tuple(parts[0::2]), slots, masked, erased, path_first)


def _new_template(fragments: tuple[bytes, ...], slots: tuple[int, ...], masked: tuple[str, ...],
                  erased: tuple[str, ...], path_first: bool = False) -> _Template:
    pattern = b"%b".join(fragment.replace(b"%", b"%%") for fragment in fragments)
    return _Template(fragments, slots, masked, erased, path_first, pattern)


def _fill(template: _Template, values: list[bytes]) -> bytes:
    """The template's fragments around ``values`` (indexed by slot): one ``%`` in C."""
    return template.pattern % tuple(map(values.__getitem__, template.slots))


# A request's input members: (rendered, masked, erased); the volatile values' masked are the caller's
_Request = tuple[bytes, tuple[str, ...], tuple[str, ...]]


class _Changing(NamedTuple):
    """What a request's shape template leaves out (method, path, headers without the volatile
    ones, ``parsed_*``), redacted and rendered: a function of the request's fingerprint.
    ``values`` fill the template's method, path, parsed_path, parsed_query, parsed_body and
    truncated_body slots; ``key`` is the shape's. Made for every request that does not
    repeat: a named tuple, which costs less to make than a frozen dataclass."""

    key: Any
    headers: bytes
    values: tuple[bytes, ...]
    masked: tuple[str, ...]
    erased: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Verdict:
    """A record's members from ``allowed`` to ``spiffe_id`` rendered, what redaction masked
    there, and the (subject, spiffe_id) columns as redacted."""

    rendered: bytes
    masked: tuple[str, ...]
    subject: str
    spiffe_id: str


@dataclass(frozen=True, slots=True)
class _Who:
    """An identity's ``"identity":{...}`` member rendered, its pointers, and its (subject,
    spiffe_id) columns."""

    rendered: bytes
    masked: tuple[str, ...]
    erased: tuple[str, ...]
    subject: str
    spiffe_id: str


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Memo(OrderedDict[_K, _V]):
    """A dict of at most ``size`` entries, the oldest out first, one at a time (clearing all
    4,096 at once freed their trees in one go, a pause of milliseconds on the event loop, which
    builds them). Ordered, so the oldest is at hand: ``next(iter(a_dict))`` on a plain dict walks
    every slot deleted at the front of the table before the first live one, up to a third of
    the table between two resizes: 2.2 µs per eviction with the caches warm (0.2 here), more in
    the server, where the event loop's work between two slices has evicted those slots from the
    caches; traffic that does not repeat evicts once per record."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: _K, entry: _V) -> None:
        if len(self) >= self.size and key not in self:
            self.popitem(last=False)
        self[key] = entry


class _Strings:
    """Strings that repeat (codes, messages, subjects) scrubbed and rendered once per value:
    (redacted, its JSON, whether scrubbing changed it); at most ``size`` kept, oldest out first."""

    __slots__ = ("_seen",)

    def __init__(self, size: int) -> None:
        self._seen: _Memo[str, tuple[str, bytes, bool]] = _Memo(size)

    def __call__(self, text: str) -> tuple[str, bytes, bool]:
        seen = self._seen
        entry = seen.get(text)
        if entry is None:
            redacted = scrub_text(text) if len(text) >= 8 else text
            entry = (redacted, _kept(_dumps(redacted)), redacted != text)
            seen.keep(text, entry)
        return entry


class _Timestamps:
    """``rfc3339`` (UTF-8) with its seconds formatted once per second rather than once per record."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = math.nan
        self._prefix = b""

    def __call__(self, seconds: float) -> bytes:
        # datetime.fromtimestamp's own arithmetic (modf, microseconds rounded half to even,
        # a carry into the next second), without making a datetime per record
        fraction, whole = math.modf(seconds)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1.0, micros - 1_000_000
        elif micros < 0:
            whole, micros = whole - 1.0, micros + 1_000_000
        if whole != self._second:
            self._second = whole
            self._prefix = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.").encode()
        return self._prefix + b"%06dZ" % micros


class RecordBuilder:
    """Decisions → redacted ``AuditRecord``s. The fast path renders a record's line from
    fragments kept across requests (``memo_size`` of each kind, oldest out first): the
    request's members per (fingerprint, which volatile values it has), the identity per
    identity fingerprint, results and signals per rendered value, strings per value. Only the
    volatile values, and what no fragment holds, are redacted and rendered per record. The
    fragments are bytes, not trees: thousands kept cost the garbage collector nothing.
    Used by one thread at a time (the audit log's worker)."""

    def __init__(self, *, path: str, labels: Mapping[str, str], redactor: Redactor, memo_size: int = 4096,
                 shapes: bool = True, in_c: bool = True) -> None:
        self.path = path
        self.shapes = shapes  # False: templates per fingerprint only (what came before shapes; tests compare)
        self.labels = labels
        self.redactor = redactor
        self.memo_size = memo_size
        # (fingerprint, volatile shape) -> _Template | _UNSPLIT
        self._templates: _Memo[tuple[Any, ...], Any] = _Memo(memo_size)
        # (shape key, volatile shape) -> _Template | _UNSPLIT
        self._shapes: _Memo[tuple[Any, ...], Any] = _Memo(memo_size)
        # fingerprint -> what its shape's template leaves out, once the fingerprint was _sighted before
        self._changing: _Memo[bytes, _Changing] = _Memo(memo_size)
        self._sighted: _Memo[bytes, None] = _Memo(memo_size)
        self._verdicts: _Memo[tuple[Any, ...], _Verdict] = _Memo(memo_size)
        self._identities: _Memo[bytes, _Who] = _Memo(memo_size)
        # rendered result -> redacted JSON, masked
        self._results: _Memo[bytes, tuple[bytes, tuple[str, ...]]] = _Memo(memo_size)
        self._signals: _Memo[bytes, tuple[bytes, tuple[str, ...], tuple[str, ...]]] = _Memo(memo_size)
        self._strings = _Strings(memo_size)
        self._timestamp = _Timestamps()
        # a record's first members: its decision id, timestamp and policy revision in slots
        head = (b'{"decision_id":', b',"timestamp":"',
                b'",' + b'"path":' + _dumps(path) + b',"labels":' + _dumps(dict(labels)) + b',' + _BUNDLES,
                b'}},"input":{')
        self._head = b"%b".join(part.replace(b"%", b"%%") for part in head)
        # what the C form of _fast reads (_volatile_cut.record), by position; None: the Python form only
        self.c_state = (self, self._changing, self._sighted, self._shapes, self._verdicts, self._identities,
                        self._signals, self._timestamp, head) if in_c and shapes and _volatile_cut else None

    def build(self, decision: "Decision", facts: Facts | None, now: float, *, handler_ns: int) -> AuditRecord:
        if facts is not None and self._from_facts(decision, facts):
            volatile = getattr(facts.attributes_factory, "volatile", None)
            if isinstance(volatile, Volatile) and facts.fingerprint:
                try:
                    state = self.c_state
                    record = None if state is None else _volatile_cut.record(state, decision, facts, volatile, now,
                                                                             handler_ns)
                    if record is None:
                        record = self._fast(decision, facts, volatile, now, handler_ns)
                except (TypeError, orjson.JSONEncodeError):  # a value orjson refuses: the whole path renders it
                    record = None
                if record is not None:
                    return record
        return self._whole(decision, facts, now, handler_ns)

    def _fast(self, decision: "Decision", facts: Facts, volatile: Volatile, now: float,
              handler_ns: int) -> AuditRecord | None:
        pieces = [self._head % (_dumps(decision.decision_id), self._timestamp(now), _dumps(decision.policy_version))]
        redacted, volatile_masked = self.redactor.redact_volatile(volatile)
        volatile_values = self._volatile_values(redacted)
        request = self._by_shape(facts, volatile, redacted, volatile_values) if self.shapes else _UNSPLIT
        if request is _UNSPLIT:
            request = self._by_fingerprint(facts, volatile, redacted, volatile_values)
        if request is None:
            return None
        rendered_request, request_masked, request_erased = request
        pieces.append(rendered_request)
        person = self._who(decision)
        signals, signals_masked, signals_erased = self._signals_member(decision.signals)
        pieces += (b",", person.rendered, b",", signals, b"}")
        masked = [*request_masked, *person.masked, *volatile_masked, *signals_masked]
        erased = [*request_erased, *person.erased, *signals_erased]
        if decision.result is not None:
            result, result_masked = self._result(decision.result)
            pieces += (b',"result":', result)
            masked += result_masked
        if facts.source_address:
            requested_by = f"{facts.source_address}:{facts.source_port}" if facts.source_port else \
                facts.source_address
            pieces += (b',"requested_by":', self._scanned("requested_by", requested_by, masked, repeats=False)[1])
        # an int within 64 bits as orjson writes it, one format cheaper (anything else: orjson, which may refuse)
        pieces.append(b',"metrics":{"timer_server_handler_ns":%d},' % handler_ns
                      if type(handler_ns) is int and -_INT64 <= handler_ns < _INT64
                      else b',"metrics":{"timer_server_handler_ns":%b},' % _dumps(handler_ns))
        verdict = self._verdict(decision, person)
        pieces.append(verdict.rendered)
        masked += verdict.masked
        subject, spiffe_id = verdict.subject, verdict.spiffe_id
        if decision.dry_run:
            pieces += (b',"would_allow":', _dumps(decision.would_allow))
        explanation = getattr(decision, "explanation", None)
        if explanation is not None:  # explain mode: rare, redacted as the whole path does
            explained, explanation_masked, explanation_erased = self.redactor.redact_member("explanation",
                                                                                           explanation)
            pieces += (b',"explanation":', _dumps(explained, default=str))
            masked += explanation_masked
            erased += explanation_erased
        transport = _TRANSPORTS.get(facts.transport)
        pieces.append(transport if transport is not None else b',"transport":' + _dumps(facts.transport))
        if facts.request_id:
            if facts.request_id == volatile.request_id:  # redacted and rendered for the attributes already
                pieces += (b',"request_id":', volatile_values[_REQUEST_ID])
                if redacted.request_id != volatile.request_id:
                    masked.append("/request_id")
            else:
                pieces += (b',"request_id":', self._scanned("request_id", facts.request_id, masked, repeats=False)[1])
        if erased:
            pieces += (b',"erased":', _dumps(erased))
        if masked:
            pieces += (b',"masked":', _dumps(masked))
        pieces.append(b"}")
        # positional: keywords cost a record 0.2 µs (decision_id, timestamp, subject, spiffe_id, allowed, code,
        # policy_version, document, line)
        return AuditRecord(decision.decision_id, now, subject, spiffe_id, decision.allowed, decision.code,
                           decision.policy_version, None, b"".join(pieces))

    def _verdict(self, decision: "Decision", person: _Who) -> _Verdict:
        """``allowed`` to ``spiffe_id``: what was decided and for whom, the same for every
        request of one route and user; rendered once per distinct value."""
        key = (decision.allowed, decision.code, decision.reason, decision.http_status, decision.phase,
               decision.cached, decision.dry_run, person.subject, person.spiffe_id)
        entry = self._verdicts.get(key)
        if entry is None:
            masked: list[str] = []
            pieces = (b'"allowed":', _dumps(decision.allowed), b',"reason":',
                      self._scanned("reason", decision.code, masked)[1],
                      b',"message":', self._scanned("message", decision.reason, masked)[1],
                      b',"http_status":', _dumps(decision.http_status), b',"phase":', _dumps(decision.phase),
                      b',"cached":', _dumps(decision.cached), b',"dry_run":', _dumps(decision.dry_run))
            subject, subject_json = self._scanned("subject", person.subject, masked)
            spiffe_id, spiffe_id_json = self._scanned("spiffe_id", person.spiffe_id, masked)
            entry = _Verdict(b"".join((*pieces, b',"subject":', subject_json, b',"spiffe_id":', spiffe_id_json)),
                             tuple(masked), subject, spiffe_id)
            self._verdicts.keep(key, entry)
        return entry

    def _by_fingerprint(self, facts: Facts, volatile: Volatile, redacted: Volatile,
                        volatile_values: list[bytes]) -> _Request | None:
        """The request's input members from the template of its fingerprint (a request whose
        factory cannot tell its shape); ``redacted``: ``volatile`` redacted, ``volatile_values``
        its values rendered (``_volatile_values``)."""
        template = self._template(facts, volatile)
        if template is _UNSPLIT:
            return None
        values = volatile_values + [_dumps(value) for value in redacted.headers.values()]
        return _fill(template, values), template.masked, template.erased

    def _by_shape(self, facts: Facts, volatile: Volatile, redacted: Volatile, volatile_values: list[bytes]) -> Any:
        """The request's input members from the template of its shape (``facts.ShapedAttributeSource``),
        the method, path, headers and what is parsed from them redacted and rendered per
        request, kept per fingerprint once it repeats (``_sighted``); ``_UNSPLIT`` when the shape is unknown or
        cannot be templated (the fingerprint's template may still serve), None when this
        request takes the whole path."""
        shape: Shape | None = None
        changing = self._changing.get(facts.fingerprint)
        if changing is None:
            shape_of = getattr(facts.attributes_factory, "shape", None)
            shape = shape_of(facts) if shape_of is not None else None
            if shape is None:
                return _UNSPLIT
            key = shape[0]
        else:
            key = changing.key
        template_key = (key, bool(volatile.request_id), bool(volatile.port), volatile.time_value is not None,
                        bool(volatile.headers))
        template = self._shapes.get(template_key)
        if template is None:
            if shape is None:  # the shape's template went out of the memo: this request's shape again
                shape = facts.attributes_factory.shape(facts)  # type: ignore[union-attr]  # it had one
                if shape is None:
                    return _UNSPLIT
            template = self._make_shape_template(facts, volatile, shape)
            if template is None:
                return None
            self._shapes.keep(template_key, template)
        if template is _UNSPLIT:
            return _UNSPLIT
        if changing is None:
            assert shape is not None
            # Kept from a request's second sighting on: traffic that does not repeat then keeps
            # nothing of its own (no copies made to be kept, no kept part evicted per record).
            fingerprint = facts.fingerprint
            repeat = fingerprint in self._sighted
            changing = self._redact_changing(facts, shape, template.path_first, keep=repeat)
            if changing is None:
                return None
            if repeat:
                self._changing.keep(fingerprint, changing)
            else:
                self._sighted.keep(fingerprint, None)
        headers_json = changing.headers
        if redacted.headers:  # with_volatile puts them last: two objects of distinct names joined
            extra = _dumps(redacted.headers)
            headers_json = extra if len(headers_json) == 2 else headers_json[:-1] + b"," + extra[1:]
        return (_fill(template, [*volatile_values, headers_json, *changing.values]),
                (*template.masked, *changing.masked), (*template.erased, *changing.erased))

    def _redact_changing(self, facts: Facts, shape: Shape, path_first: bool, *, keep: bool) -> _Changing | None:
        """``keep``: whether it will be kept (its parts are then copied, see ``_kept``)."""
        key, method, path, headers = shape
        try:  # as build_input parses them (a request it refuses takes the whole path, which says so)
            parsed_body, truncated = parse_body(facts.headers, facts.body, facts.raw_body)
            if parsed_body is None:  # the usual request without a body: in C, when its path is inert
                inert = render_inert_request(method, path, headers)
                if inert is not None:
                    (headers_json, *values), masked = inert  # bytes of their own size: nothing to _kept
                    return _Changing(key, headers_json, (*values, b"null", _BOOL[truncated]), masked, ())
            parsed_path, parsed_query = parse_path_and_query(facts.path)
        except AuthzError:
            return None
        redacted = self.redactor.redact_request(method, path, headers, parsed_path, parsed_query, parsed_body,
                                                path_first=path_first)
        members = redacted.members
        rendered: tuple[bytes, ...] = (
            _dumps(members["headers"]), _dumps(members["method"]), _dumps(members["path"]),
            _dumps(members["parsed_path"]), _dumps(members["parsed_query"]), _dumps(members["parsed_body"]))
        if keep:
            rendered = tuple(map(_kept, rendered))
        return _Changing(key, rendered[0], (*rendered[1:], _BOOL[truncated]), redacted.masked, redacted.erased)

    def _make_shape_template(self, facts: Facts, volatile: Volatile, shape: Shape) -> Any:
        """The input members of ``facts`` with a slot for every value that changes within the
        shape (the volatile ones, method, path, headers, ``parsed_*``), redacted and rendered."""
        _, method, path, headers = shape
        try:
            split = stable_input(facts)
        except AuthzError:  # this request: the whole path; the next of its shape may do
            return None
        if split is None:
            return _UNSPLIT
        slotted = _slotted(volatile, dict.fromkeys(volatile.headers, ""))
        attributes = dict(with_volatile(split["attributes"], slotted))
        if "request" in attributes:
            request = attributes["request"] = dict(attributes["request"])
            http = dict(request.get("http", {}))
        else:
            request, http = {}, {}
        stable_headers = [(k, v) for k, v in http.get("headers", {}).items() if k not in volatile.headers]
        if (http.get("method", "") != method or http.get("path", "") != path
                or stable_headers != [(k, headers[k]) for k in headers]):  # not what the shape says: never templated
            return _UNSPLIT
        slots = [_REQUEST_ID] * bool(volatile.request_id) + [_PORT] * bool(volatile.port)
        for name, slot in (("method", _METHOD), ("path", _PATH), ("headers", _HEADERS_ALL)):
            if name in http:
                http[name] = _slot(slot)
                slots.append(slot)
        if "http" in request:
            request["http"] = http
        if volatile.time_value is not None:  # where with_volatile puts it: last in ``request``
            if "request" not in attributes:
                return _UNSPLIT
            request["time"] = _slot(_TIME)
            slots.append(_TIME)
        members = {**split, "attributes": attributes}
        for name, slot in (("parsed_path", _PARSED_PATH), ("parsed_query", _PARSED_QUERY),
                           ("parsed_body", _PARSED_BODY), ("truncated_body", _TRUNCATED)):
            members[name] = _slot(slot)
            slots.append(slot)
        keys = list(http)
        path_first = "path" in http and "headers" in http and keys.index("path") < keys.index("headers")
        return self._render_template(members, sorted(slots), path_first)

    def _render_template(self, members: dict[str, Any], expected: list[int], path_first: bool) -> Any:
        stable = self.redactor.redact_input_parts(members)
        return _spliced(stable.members, expected, stable.masked, stable.erased, path_first)

    @staticmethod
    def _volatile_values(redacted: Volatile) -> list[bytes]:
        """The request id, port and time rendered, for the _REQUEST_ID, _PORT and _TIME slots."""
        time_value = redacted.time_value
        return [_dumps(redacted.request_id), _dumps(redacted.port),
                b"" if time_value is None else _time_json(*time_value)]

    def _template(self, facts: Facts, volatile: Volatile) -> Any:
        key = (facts.fingerprint, bool(volatile.request_id), bool(volatile.port), volatile.time_value is not None,
               tuple(volatile.headers))
        entry = self._templates.get(key)
        if entry is None:
            entry = self._make_template(facts, volatile)
            self._templates.keep(key, entry)
        return entry

    def _make_template(self, facts: Facts, volatile: Volatile) -> Any:
        try:
            split = stable_input(facts)
        except AuthzError:  # the whole path builds what it can of such a request
            return _UNSPLIT
        if split is None:
            return _UNSPLIT
        stable = self.redactor.redact_input_parts(split)
        slotted = _slotted(volatile, {name: _slot(_HEADERS + index) for index, name in enumerate(volatile.headers)})
        attributes = with_volatile(stable.members["attributes"], slotted)
        if volatile.time_value is not None:  # where with_volatile puts it: last in ``request``
            attributes = dict(attributes)
            request = attributes["request"] = dict(attributes.get("request", {}))
            request["time"] = _slot(_TIME)
        expected = sorted([_REQUEST_ID] * bool(volatile.request_id) + [_PORT] * bool(volatile.port)
                          + [_TIME] * (volatile.time_value is not None)
                          + [_HEADERS + index for index in range(len(volatile.headers))])
        return _spliced({**stable.members, "attributes": attributes}, expected, stable.masked, stable.erased)

    def _who(self, decision: "Decision") -> _Who:
        identity = decision.identity
        key = identity.fingerprint
        entry = self._identities.get(key) if key else None
        if entry is None:
            subject, spiffe_id = who(identity.document)
            redacted = self.redactor.redact_input_parts({"identity": dict(identity.document)})
            entry = _Who(_dumps(redacted.members)[1:-1], redacted.masked, redacted.erased, subject, spiffe_id)
            if key:
                self._identities.keep(key, entry)
        return entry

    def _signals_member(self, signals: Mapping[str, Any]) -> tuple[bytes, tuple[str, ...], tuple[str, ...]]:
        key = _dumps(signals)
        entry = self._signals.get(key)
        if entry is None:
            redacted = self.redactor.redact_input_parts({"signals": dict(signals)})
            entry = (_dumps(redacted.members)[1:-1], redacted.masked, redacted.erased)
            self._signals.keep(key, entry)
        return entry

    def _result(self, result: Any) -> tuple[bytes, tuple[str, ...]]:
        if type(result) is bool:
            return _BOOL[result], ()
        key = _dumps(result)
        entry = self._results.get(key)
        if entry is None:
            redacted, masked, _ = self.redactor.redact_member("result", result)
            entry = (_dumps(redacted), tuple(masked))
            self._results.keep(key, entry)
        return entry

    def _scanned(self, member: str, value: Any, masked: list[str], *, repeats: bool = True) -> tuple[Any, bytes]:
        """A top-level member as ``Redactor.redact`` leaves it, and its JSON; strings that
        ``repeats`` are scrubbed once per distinct value."""
        if type(value) is not str:
            redacted, more, _ = self.redactor.redact_member(member, value)
            masked += more
            return redacted, _dumps(redacted)
        if repeats:
            redacted, rendered, changed = self._strings(value)
        else:
            redacted = scrub_text(value)
            rendered, changed = _dumps(redacted), redacted != value
        if changed:
            masked.append("/" + member)
        return redacted, rendered

    def _whole(self, decision: "Decision", facts: Facts | None, now: float, handler_ns: int) -> AuditRecord:
        """The straightforward path: the whole record built, then redacted as one tree."""
        document = build_document(decision, facts, now, handler_ns=handler_ns, path=self.path, labels=self.labels)
        document = self.redactor.redact(document)
        return AuditRecord(
            decision_id=decision.decision_id, timestamp=now, subject=document["subject"],
            spiffe_id=document["spiffe_id"], allowed=decision.allowed, code=decision.code,
            policy_version=decision.policy_version, document=document, line=render_line(document))

    def build_failed(self, decision: "Decision", facts: Facts | None, now: float, error: BaseException) -> AuditRecord:
        """The record of a decision whose full record could not be built (a bug, or a request
        too deep to walk): what the server decided, from values it made itself, with
        ``input`` and ``result`` erased and ``audit_error`` naming why. Zero trust records
        every decision; this one says that its details are missing, not that it never happened."""
        document: dict[str, Any] = {
            "decision_id": str(decision.decision_id),
            "timestamp": self._timestamp(now).decode(),
            "path": self.path,
            "labels": dict(self.labels),
            "bundles": {BUNDLE_NAME: {"revision": str(decision.policy_version)}},
            "allowed": bool(decision.allowed),
            "reason": scrub_text(str(decision.code)),
            "http_status": int(decision.http_status),
            "phase": str(decision.phase),
            "cached": bool(decision.cached),
            "dry_run": bool(decision.dry_run),
            "audit_error": f"record_failed: {type(error).__name__}",
            "erased": ["/input", "/result"],
        }
        if facts is not None:
            document["transport"] = str(facts.transport)
        return AuditRecord(
            decision_id=document["decision_id"], timestamp=now, subject="", spiffe_id="",
            allowed=document["allowed"], code=document["reason"], policy_version=str(decision.policy_version),
            document=document, line=render_line(document))

    @staticmethod
    def _from_facts(decision: "Decision", facts: Facts) -> bool:
        """Whether the record's input is what ``build_input`` makes of ``facts``: none was kept
        (a cache hit, a projected input), or the one kept is whole and holds the facts' own
        attributes (``build_input`` puts them there, so the rest is a function of the facts)."""
        kept = decision.input
        if kept is None:
            return True
        attributes = facts.built_attributes
        return (attributes is not None and kept.get("attributes") is attributes
                and len(kept) == (_WHOLE_INPUT_MEMBERS + 1 if facts.source_principal else _WHOLE_INPUT_MEMBERS))


if _volatile_cut is not None:
    _volatile_cut.configure_records(_dumps, scrub_text, header_rule, header_pointer, TOKEN_PARAMETERS, _Template,
                                    _Changing, AuditRecord, parse_body)
