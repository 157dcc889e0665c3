"""OPA's status API: what each bundle is doing, POSTed to ``status.service``.

The document is OPA's ``UpdateRequestV1``: ``labels`` (the same ``id`` the decision logs
carry), ``bundles.<name>`` (``name``, ``active_revision``, ``last_successful_activation``,
``last_successful_download``, ``last_successful_request``, ``last_request``, ``type``, ``size``,
and on failure ``code`` ``bundle_error``, ``message`` and ``http_code``), ``decision_logs``
(``code`` ``decision_log_error``, ``message``, ``http_code`` on failure) and ``plugins``
(``bundle``/``decision_logs``/``status`` with ``state`` ``OK``, ``NOT_READY`` or ``ERROR``).
A report is sent whenever a status changes (reports coalesce: only the latest is sent) and
retried with backoff while the service is down; a report never blocks what caused it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from .download import backoff
from .service import ServiceClient, ServiceError

log = logging.getLogger("authz_server.bundles")

NEVER = "0001-01-01T00:00:00Z"  # Go's zero time, as OPA reports what never happened


def rfc3339(seconds: float | None) -> str:
    if not seconds:
        return NEVER
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class BundleStatus:
    name: str
    active_revision: str = ""
    last_successful_activation: float | None = None
    last_successful_download: float | None = None
    last_successful_request: float | None = None
    last_request: float | None = None
    size: int = 0
    code: str = ""  # OPA's bundle_error when the last attempt failed
    message: str = ""
    http_code: int = 0
    error_code: str = ""  # ours: the BundleError/PolicyError code behind the message

    def failed(self, message: str, *, error_code: str, http_code: int = 0) -> None:
        self.code, self.message, self.http_code, self.error_code = "bundle_error", message, http_code, error_code

    def cleared(self) -> None:
        self.code = self.message = self.error_code = ""
        self.http_code = 0

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "last_successful_activation": rfc3339(self.last_successful_activation),
            "last_successful_download": rfc3339(self.last_successful_download),
            "last_successful_request": rfc3339(self.last_successful_request),
            "last_request": rfc3339(self.last_request),
        }
        if self.active_revision:
            document["active_revision"] = self.active_revision
        if self.last_successful_download:
            document["type"] = "snapshot"
        if self.size:
            document["size"] = self.size
        if self.code:
            document.update(code=self.code, message=self.message)
            if self.http_code:
                document["http_code"] = str(self.http_code)
        return document


@dataclass
class DecisionLogStatus:
    message: str = ""
    http_code: int = 0

    def to_json(self) -> dict[str, Any]:
        if not self.message:
            return {}
        document: dict[str, Any] = {"code": "decision_log_error", "message": self.message}
        if self.http_code:
            document["http_code"] = str(self.http_code)
        return document


@dataclass
class StatusSnapshot:
    labels: Mapping[str, str]
    bundles: Mapping[str, BundleStatus] = field(default_factory=dict)
    decision_logs: DecisionLogStatus | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"labels": dict(self.labels)}
        plugins: dict[str, Any] = {"status": {"state": "OK"}}
        if self.bundles:
            document["bundles"] = {name: status.to_json() for name, status in self.bundles.items()}
            ready = all(s.last_successful_activation and not s.code for s in self.bundles.values())
            failed = any(s.code for s in self.bundles.values())
            plugins["bundle"] = {"state": "OK" if ready else "ERROR" if failed else "NOT_READY"}
        if self.decision_logs is not None:
            document["decision_logs"] = self.decision_logs.to_json()
            plugins["decision_logs"] = {"state": "ERROR" if self.decision_logs.message else "OK"}
        document["plugins"] = plugins
        return document


class StatusReporter:
    """Sends ``snapshot()`` to the status service each time ``changed()`` is called."""

    def __init__(self, client: ServiceClient, resource: str, snapshot: Callable[[], StatusSnapshot], *,
                 max_retry_delay: float = 30.0) -> None:
        self.client = client
        self.resource = resource
        self.snapshot = snapshot
        self.max_retry_delay = max_retry_delay
        self.sent = 0
        self.failures = 0
        self.last_error = ""
        self._dirty = asyncio.Event()

    def changed(self) -> None:
        self._dirty.set()

    async def send(self) -> None:
        body = json.dumps(self.snapshot().to_json(), separators=(",", ":")).encode()
        reply = await self.client.request("POST", self.resource, content=body,
                                          headers={"content-type": "application/json"})
        if not 200 <= reply.status < 300:
            raise ServiceError(f"status update failed, server replied with HTTP {reply.status}",
                               http_status=reply.status)

    async def run(self) -> None:
        retries = 0
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.send()
            except ServiceError as exc:
                self.failures += 1
                retries += 1
                if exc.message != self.last_error:
                    log.warning("%s", exc.message)
                self.last_error = exc.message
                self._dirty.set()  # the latest snapshot is still owed
                await asyncio.sleep(backoff(retries, self.max_retry_delay))
                continue
            retries = 0
            self.sent += 1
            self.last_error = ""
