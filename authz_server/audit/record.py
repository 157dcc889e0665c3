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

Records are built by ``builder.RecordBuilder`` (the fast path); ``build_document`` +
``Redactor.redact`` + ``render.reference_line`` is the straightforward whole path it must
agree with (tests/unit/test_audit_fast_path.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import AuthzError
from ..facts import Facts, build_input

if TYPE_CHECKING:
    from ..decision import Decision

BUNDLE_NAME = "authz"


class AuditRecord:
    """A redacted record plus the columns sinks index on. ``line`` is the record as one line
    of JSON, rendered once for every sink that writes text, and ``encoded`` the same in UTF-8
    (what the file and HTTP sinks write): the fast path renders bytes, and each form is made
    from the other only when a sink asks for it (decoding on the event loop and encoding
    again on the file sink's thread was a copy of every record each way, for nothing). ``document``
    is the same record as a dict, parsed from ``line`` the first time something asks (the
    fast path renders the line from kept fragments and never builds the tree; sinks only
    read the line)."""

    __slots__ = ("decision_id", "timestamp", "subject", "spiffe_id", "allowed", "code", "policy_version",
                 "_document", "_line", "_encoded")

    def __init__(self, decision_id: str, timestamp: float, subject: str, spiffe_id: str, allowed: bool, code: str,
                 policy_version: str, document: Mapping[str, Any] | None, line: str | bytes) -> None:
        self.decision_id = decision_id
        self.timestamp = timestamp  # Unix seconds
        self.subject = subject
        self.spiffe_id = spiffe_id
        self.allowed = allowed
        self.code = code
        self.policy_version = policy_version
        self._document = document
        self._line: str | None
        self._encoded: bytes | None
        if isinstance(line, bytes):  # UTF-8, as orjson writes it
            self._line, self._encoded = None, line
        else:
            self._line, self._encoded = line, None

    @property
    def line(self) -> str:
        if self._line is None:
            self._line = self._encoded.decode("utf-8")  # type: ignore[union-attr]  # one of the two is set
        return self._line

    @property
    def encoded(self) -> bytes:
        """``line`` in UTF-8 (lone surrogates, which only the standard library's rendering
        can hold, written back as the bytes they were decoded from)."""
        if self._encoded is None:
            self._encoded = self._line.encode("utf-8", "surrogateescape")  # type: ignore[union-attr]
        return self._encoded

    @property
    def document(self) -> Mapping[str, Any]:
        if self._document is None:
            self._document = json.loads(self.line)
        return self._document

    def __repr__(self) -> str:
        return f"AuditRecord({self.decision_id!r}, allowed={self.allowed!r}, code={self.code!r})"


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
