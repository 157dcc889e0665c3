"""One decision as an audit record, in the shape of OPA's decision logs.

OPA's fields: ``decision_id``, ``timestamp`` (RFC 3339, UTC), ``path`` (the policy rule
queried, ``envoy/authz/allow``), ``input``, ``result``, ``bundles`` (here one bundle,
``authz``, whose ``revision`` is our policy version), ``labels`` (``app``, ``id`` of this
server instance, ``version``), ``metrics`` (``timer_server_handler_ns``), ``requested_by``
(the peer address Envoy saw), ``masked``/``erased`` (what redaction changed).
Ours, beside them: ``allowed``, ``reason`` (the stable code), ``message``, ``http_status``,
``phase``, ``cached``, ``dry_run``/``would_allow``, ``subject``, ``spiffe_id``,
``transport`` and ``request_id`` (Envoy's ``x-request-id``).

Built by the writer, off the request path: a cache hit carries no input document, so it
is built here from the facts. Most of it (the attributes, ``parsed_*``) depends only on the
request's fingerprint, the decision cache's key, and ``identity`` only on the identity's
fingerprint: ``RecordBuilder`` keeps both, redacted, for the next request that repeats them,
and redacts only what differs per request (the volatile attribute values, ``signals``, the
result, the message).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import AuthzError
from ..facts import Facts, build_input, stable_input, with_volatile
from .redact import Redacted, Redactor

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


class RecordBuilder:
    """Decisions → redacted ``AuditRecord``s, keeping the redacted fingerprint-only parts of
    the input documents for the requests that repeat them (``memo_size`` of each kind)."""

    def __init__(self, *, path: str, labels: Mapping[str, str], redactor: Redactor, memo_size: int = 4096) -> None:
        self.path = path
        self.labels = labels
        self.redactor = redactor
        self.memo_size = memo_size
        self._requests: dict[bytes, Any] = {}  # Facts.fingerprint -> Redacted stable members, or _UNSPLIT
        self._identities: dict[bytes, Redacted] = {}  # Identity.fingerprint -> Redacted {"identity": ...}

    def build(self, decision: "Decision", facts: Facts | None, now: float, *, handler_ns: int) -> AuditRecord:
        clean: tuple[Redacted, ...] = ()
        input_document = None
        if decision.input is None and facts is not None:
            stable = self._stable(facts)
            if stable is not None:
                volatile, volatile_masked = self.redactor.redact_volatile(
                    facts.attributes_factory.volatile)  # type: ignore[union-attr]
                identity = self._identity(decision)
                input_document = {**stable.members,
                                  "attributes": with_volatile(stable.members["attributes"], volatile),
                                  **identity.members, "signals": dict(decision.signals)}
                clean = (stable, identity, Redacted({}, volatile_masked))
        document = build_document(decision, facts, now, handler_ns=handler_ns, path=self.path, labels=self.labels,
                                  input_document=input_document)
        document = self.redactor.redact(document, clean=clean)
        return AuditRecord(
            decision_id=decision.decision_id, timestamp=now, subject=document["subject"],
            spiffe_id=document["spiffe_id"], allowed=decision.allowed, code=decision.code,
            policy_version=decision.policy_version, document=document,
            line=json.dumps(document, separators=(",", ":"), default=str),
        )

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

    def _identity(self, decision: "Decision") -> Redacted:
        identity = decision.identity
        key = identity.fingerprint
        entry = self._identities.get(key) if key else None
        if entry is None:
            entry = self.redactor.redact_input_parts({"identity": dict(identity.document)})
            if key:
                self._remember(self._identities, key, entry)
        return entry

    def _remember(self, memo: dict[bytes, Any], key: bytes, entry: Any) -> None:
        if len(memo) >= self.memo_size:
            memo.clear()
        memo[key] = entry
