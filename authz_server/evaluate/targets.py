"""What the attacks run against: a ``Target`` sends requests into some deployment of the mesh
and reads back what its audit log said about them.

Implemented here by ``inprocess.InProcessTarget`` (the decision pipeline, no network) and
``frontproxy.EnvoyTarget`` (a real Envoy in front of a real ``authz-server serve``), each with
zero trust on or off. The full embedded mesh (``mesh/launcher.py``) plugs in by implementing
the same protocol; see docs/evaluation.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from .model import Outcome, Request


class Target(Protocol):
    name: str  # how the report names this deployment
    zero_trust: bool  # False: the baseline, requests are only routed
    through_envoy: bool  # requests cross a real Envoy (its path normalisation, its TLS)
    enforces_tls: bool  # workloads must prove their SPIFFE ID with a client certificate

    async def send(self, request: Request) -> Outcome:
        """Send one request as its client would; never raises for a refusal (see ``Outcome``)."""
        ...

    def user_token(self, user: str) -> str:
        """A fresh, valid access token for ``user`` from the provider the target trusts."""
        ...

    def forged_token(self, defect: str, user: str) -> str:
        """An attacker's token (``world.TokenForge.craft`` defects) aimed at this target."""
        ...

    async def exchange(self, actor: str, subject_token: str, audience: str) -> str:
        """RFC 8693: ``actor`` (a SPIFFE ID, proven by its certificate) trades ``subject_token``
        for a token for ``audience``."""
        ...

    async def audit_records(self, decision_ids: Iterable[str]) -> dict[str, Mapping[str, Any]]:
        """The audit records (read back from the ``file:`` sink) of these decisions, waiting a
        little for the ones not written yet; absent ids have no record."""
        ...

    async def tls_refusals(self) -> int:
        """Client handshakes refused so far because the certificate did not verify (Envoy's
        ``ssl.fail_verify_error`` counters); 0 where there is no TLS layer."""
        ...


class AuditFile:
    """Reads a ``file:`` audit sink back, one JSON record per line, as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._records: dict[str, Mapping[str, Any]] = {}

    def _read_new(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            self._records[str(record.get("decision_id", ""))] = record
        self._offset += end

    async def records(self, decision_ids: Iterable[str], *, timeout: float = 5.0,
                      flush: Any = None) -> dict[str, Mapping[str, Any]]:
        wanted = {d for d in decision_ids if d}
        deadline = time.monotonic() + timeout
        while True:
            if flush is not None:
                await flush()
            self._read_new()
            missing = wanted - self._records.keys()
            if not missing or time.monotonic() > deadline:
                return {d: self._records[d] for d in wanted if d in self._records}
            await asyncio.sleep(0.05)  # polling a file another process appends to

    def all(self) -> list[Mapping[str, Any]]:
        self._read_new()
        return list(self._records.values())
