"""One decision as an audit record, in the shape of OPA's decision logs.

OPA's fields: ``decision_id``, ``timestamp`` (RFC 3339, UTC), ``path`` (the policy rule
queried, ``envoy/authz/allow``), ``input``, ``result``, ``bundles`` (here one bundle,
``authz``, whose ``revision`` is our policy version), ``labels`` (``app``, ``id`` of this
server instance, ``version``), ``metrics`` (``timer_server_handler_ns``), ``requested_by``
(the peer address Envoy saw), ``masked``/``erased`` (what redaction changed).
Ours, beside them: ``allowed``, ``reason`` (the stable code), ``message``, ``http_status``,
``phase``, ``cached``, ``dry_run``/``would_allow``, ``subject``, ``spiffe_id``,
``transport`` and ``request_id`` (Envoy's ``x-request-id``); ``audit_error`` only on the
short record of a decision whose full record could not be built (``build_failed``).

Built by the audit log's worker thread, off the request path: a cache hit carries no input
document, so it is built here from the facts. Most of it (the attributes, ``parsed_*``)
depends only on the request's fingerprint, the decision cache's key, and ``identity`` only on
the identity's fingerprint: ``RecordBuilder`` keeps both, redacted, for the next request that
repeats them, and redacts only what differs per request (the volatile attribute values,
``signals``, the result, the message). A decision whose policy saw the whole input document
takes the same path when that document was built from these very facts (its attributes are
the facts' own), so a record costs the same whether the policy ran or the cache answered.
The rest repeats too: the timestamp's seconds, the subject, the message and the result are
redacted once per distinct value (``_Strings``, ``_results``) and the line is rendered by
orjson (``render.py``). ``build_document`` + ``Redactor.redact`` + ``reference_line`` is the
straightforward whole path the builder must agree with (tests/unit/test_audit_fast_path.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import AuthzError
from ..facts import Facts, build_input, stable_input, with_volatile
from .redact import Redacted, Redactor, scrub_text
from .render import render_line

if TYPE_CHECKING:
    from ..decision import Decision

BUNDLE_NAME = "authz"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A redacted record plus the columns sinks index on. ``line`` is ``document`` as one
    line of JSON, rendered once for every sink that writes text."""

    decision_id: str
    timestamp: float  # Unix seconds
    subject: str
    spiffe_id: str
    allowed: bool
    code: str
    policy_version: str
    document: Mapping[str, Any]
    line: str


def rfc3339(seconds: float) -> str:
    """``2026-01-02T03:04:05.123456Z`` (microseconds: what a float of Unix seconds holds)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def query_path(query: str) -> str:
    """``data.envoy.authz.allow`` → ``envoy/authz/allow``, as OPA logs it."""
    return query.removeprefix("data.").replace(".", "/")


def who(identity: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, spiffe_id) from ``input.identity``: the user if there is one, else the workload."""
    workload = identity.get("workload") if identity else None
    spiffe_id = workload.get("spiffe_id", "") if isinstance(workload, Mapping) else ""
    user = identity.get("user") if identity else None
    subject = user.get("sub", "") if isinstance(user, Mapping) else ""
    return (str(subject or spiffe_id or ""), str(spiffe_id or ""))


def _input_for(decision: "Decision", facts: Facts | None) -> dict[str, Any] | None:
    if decision.input is not None:
        return decision.input
    if facts is None:
        return None
    try:
        return build_input(facts, decision.identity.document, decision.signals)
    except AuthzError:  # the request that was refused for this very reason: its attributes still tell
        return {"attributes": facts.attributes(), "identity": dict(decision.identity.document)}


def build_document(decision: "Decision", facts: Facts | None, now: float, *, handler_ns: int, path: str,
                   labels: Mapping[str, str], input_document: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The unredacted record (pass it to ``Redactor.redact`` before anything else sees it);
    ``input_document`` when the caller has it already."""
    subject, spiffe_id = who(decision.identity.document)
    document: dict[str, Any] = {
        "decision_id": decision.decision_id,
        "timestamp": rfc3339(now),
        "path": path,
        "labels": dict(labels),
        "bundles": {BUNDLE_NAME: {"revision": decision.policy_version}},
    }
    if input_document is None:
        input_document = _input_for(decision, facts)
    if input_document is not None:
        document["input"] = input_document
    if decision.result is not None:
        document["result"] = decision.result
    if facts is not None and facts.source_address:
        document["requested_by"] = f"{facts.source_address}:{facts.source_port}" if facts.source_port else \
            facts.source_address
    document["metrics"] = {"timer_server_handler_ns": handler_ns}
    document.update({
        "allowed": decision.allowed,
        "reason": decision.code,
        "message": decision.reason,
        "http_status": decision.http_status,
        "phase": decision.phase,
        "cached": decision.cached,
        "dry_run": decision.dry_run,
        "subject": subject,
        "spiffe_id": spiffe_id,
    })
    if decision.dry_run:
        document["would_allow"] = decision.would_allow
    explanation = getattr(decision, "explanation", None)
    if explanation is not None:  # explain mode (see explaining): redacted already, scanned again below
        document["explanation"] = explanation
    if facts is not None:
        document["transport"] = facts.transport
        if facts.request_id:
            document["request_id"] = facts.request_id
    return document


_UNSPLIT = object()  # a fingerprint whose input cannot be split (or built): the whole path each time
# attributes, parsed_path, parsed_query, parsed_body, truncated_body, version, identity, signals
# (and source_principal when there is one): build_input's whole document
_WHOLE_INPUT_MEMBERS = 8


@dataclass(frozen=True, slots=True)
class _Who:
    """An identity's redacted ``input.identity`` and its (subject, spiffe_id) columns."""

    identity: Redacted
    subject: str
    spiffe_id: str


class _Strings:
    """``scrub_text`` of strings that repeat (messages, codes, subjects), at most ``size`` kept."""

    __slots__ = ("size", "_seen")

    def __init__(self, size: int) -> None:
        self.size = size
        self._seen: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        redacted = self._seen.get(text)
        if redacted is None:
            redacted = scrub_text(text) if len(text) >= 8 else text
            if len(self._seen) >= self.size:
                self._seen.clear()
            self._seen[text] = redacted
        return redacted


class _Timestamps:
    """``rfc3339`` with its seconds formatted once per second rather than once per record."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second: tuple[int, ...] = ()
        self._prefix = ""

    def __call__(self, seconds: float) -> str:
        moment = datetime.fromtimestamp(seconds, timezone.utc)
        second = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
        if second != self._second:
            self._second, self._prefix = second, moment.strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{moment.microsecond:06d}Z"


class RecordBuilder:
    """Decisions → redacted ``AuditRecord``s, keeping the redacted fingerprint-only parts of
    the input documents for the requests that repeat them (``memo_size`` of each kind).
    Used by one thread at a time (the audit log's worker)."""

    def __init__(self, *, path: str, labels: Mapping[str, str], redactor: Redactor, memo_size: int = 4096) -> None:
        self.path = path
        self.labels = labels
        self.redactor = redactor
        self.memo_size = memo_size
        self._requests: dict[bytes, Any] = {}  # Facts.fingerprint -> Redacted stable members, or _UNSPLIT
        self._identities: dict[bytes, _Who] = {}  # Identity.fingerprint -> redacted identity and its names
        self._results: dict[Any, tuple[Any, tuple[str, ...]]] = {}  # rendered result -> redacted, masked
        self._strings = _Strings(memo_size)
        self._timestamp = _Timestamps()

    def build(self, decision: "Decision", facts: Facts | None, now: float, *, handler_ns: int) -> AuditRecord:
        stable = self._stable(facts) if facts is not None and self._from_facts(decision, facts) else None
        if stable is None:
            return self._whole(decision, facts, now, handler_ns)
        assert facts is not None
        redactor = self.redactor
        volatile, volatile_masked = redactor.redact_volatile(facts.attributes_factory.volatile)  # type: ignore[union-attr]
        person = self._who(decision)
        masked = [*stable.masked, *person.identity.masked, *volatile_masked]
        erased = [*stable.erased, *person.identity.erased]
        signals = redactor.redact_input_parts({"signals": dict(decision.signals)})
        masked += signals.masked
        erased += signals.erased
        input_document = {**stable.members, "attributes": with_volatile(stable.members["attributes"], volatile),
                          **person.identity.members, **signals.members}
        document: dict[str, Any] = {
            "decision_id": decision.decision_id,
            "timestamp": self._timestamp(now),
            "path": self.path,
            "labels": dict(self.labels),
            "bundles": {BUNDLE_NAME: {"revision": decision.policy_version}},
            "input": input_document,
        }
        if decision.result is not None:
            document["result"], result_masked = self._result(decision.result)
            masked += result_masked
        if facts.source_address:
            requested_by = f"{facts.source_address}:{facts.source_port}" if facts.source_port else \
                facts.source_address
            document["requested_by"] = self._scanned("requested_by", requested_by, masked, repeats=False)
        document["metrics"] = {"timer_server_handler_ns": handler_ns}
        scanned = self._scanned
        document["allowed"] = decision.allowed
        document["reason"] = scanned("reason", decision.code, masked)
        document["message"] = scanned("message", decision.reason, masked)
        document["http_status"] = decision.http_status
        document["phase"] = decision.phase
        document["cached"] = decision.cached
        document["dry_run"] = decision.dry_run
        document["subject"] = scanned("subject", person.subject, masked)
        document["spiffe_id"] = scanned("spiffe_id", person.spiffe_id, masked)
        if decision.dry_run:
            document["would_allow"] = decision.would_allow
        explanation = getattr(decision, "explanation", None)
        if explanation is not None:
            document["explanation"], explained, explanation_erased = redactor.redact_member("explanation",
                                                                                             explanation)
            masked += explained
            erased += explanation_erased
        document["transport"] = facts.transport
        if facts.request_id:
            document["request_id"] = scanned("request_id", facts.request_id, masked, repeats=False)
        if erased:
            document["erased"] = erased
        if masked:
            document["masked"] = masked
        return AuditRecord(
            decision_id=decision.decision_id, timestamp=now, subject=document["subject"],
            spiffe_id=document["spiffe_id"], allowed=decision.allowed, code=decision.code,
            policy_version=decision.policy_version, document=document, line=render_line(document))

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
            "timestamp": self._timestamp(now),
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
        attributes = facts._attributes
        return (attributes is not None and kept.get("attributes") is attributes
                and len(kept) == (_WHOLE_INPUT_MEMBERS + 1 if facts.source_principal else _WHOLE_INPUT_MEMBERS))

    def _scanned(self, member: str, value: Any, masked: list[str], *, repeats: bool = True) -> Any:
        """A top-level member as ``Redactor.redact`` leaves it; strings that ``repeats`` are
        scrubbed once per distinct value."""
        if type(value) is not str:
            redacted, more, _ = self.redactor.redact_member(member, value)
            masked += more
            return redacted
        redacted = self._strings(value) if repeats else scrub_text(value)
        if redacted is not value and redacted != value:
            masked.append("/" + member)
        return redacted

    def _result(self, result: Any) -> tuple[Any, tuple[str, ...]]:
        if type(result) is bool:
            return result, ()
        try:
            key: Any = render_line(result)
        except Exception:  # not renderable as a key: redacted afresh
            key = None
        entry = self._results.get(key) if key is not None else None
        if entry is None:
            redacted, masked, _ = self.redactor.redact_member("result", result)
            entry = (redacted, tuple(masked))
            if key is not None:
                self._remember(self._results, key, entry)
        return entry

    def _stable(self, facts: Facts) -> Redacted | None:
        key = facts.fingerprint
        entry = self._requests.get(key) if key else _UNSPLIT
        if entry is None:
            try:
                split = stable_input(facts)
            except AuthzError:  # the whole path builds what it can of such a request
                split = None
            entry = _UNSPLIT if split is None else self.redactor.redact_input_parts(split)
            self._remember(self._requests, key, entry)
        return None if entry is _UNSPLIT else entry

    def _who(self, decision: "Decision") -> _Who:
        identity = decision.identity
        key = identity.fingerprint
        entry = self._identities.get(key) if key else None
        if entry is None:
            subject, spiffe_id = who(identity.document)
            entry = _Who(self.redactor.redact_input_parts({"identity": dict(identity.document)}), subject, spiffe_id)
            if key:
                self._remember(self._identities, key, entry)
        return entry

    def _remember(self, memo: dict[Any, Any], key: Any, entry: Any) -> None:
        if len(memo) >= self.memo_size:
            memo.clear()
        memo[key] = entry
