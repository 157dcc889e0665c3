"""Decision audit log: one redacted record per decision, in OPA's decision-log shape,
written off the request path to pluggable sinks (stdout, rotating file, PostgreSQL), and
queried with ``authz-server audit query``. See docs/audit.md.
"""

from __future__ import annotations

from .log import AuditLog
from .record import AuditRecord
from .redact import Redactor
from .sinks import Sink, SinkUnavailable, open_sink

__all__ = ["AuditLog", "AuditRecord", "Redactor", "Sink", "SinkUnavailable", "open_sink"]
