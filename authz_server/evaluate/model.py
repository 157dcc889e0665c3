"""The evaluation's vocabulary: who exists in the evaluated world, what a request is, what came back.

The world mirrors the demo mesh (``authz_server/mesh/launcher.py``): three services in
``example.org`` (frontend → orders → payments), a federated partner domain, and a trust domain
nobody federates with. Users sign in at the dev OIDC provider; workloads prove who they are with
X.509-SVIDs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

TRUST_DOMAIN = "example.org"
PARTNER_DOMAIN = "partner.org"  # federated with example.org: trusted, but listed on no route
UNTRUSTED_DOMAIN = "evil.org"  # its own CA, federated with no one
TRUSTED_DOMAINS = (TRUST_DOMAIN, PARTNER_DOMAIN)
SERVICES = ("frontend", "orders", "payments")
AUDIENCE = "mesh"  # the audience the dev provider's tokens carry and authz-server accepts
EXCHANGE_ISSUER = "https://authz.evaluate.local/exchange"
EXCHANGE_AUDIENCE = "payments"
USER_AGENT = "evaluate-client/1"


def spiffe_id(name: str, domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{domain}/{name}"


FRONTEND = spiffe_id("frontend")
ORDERS = spiffe_id("orders")
PAYMENTS = spiffe_id("payments")
AUDITOR = spiffe_id("auditor", PARTNER_DOMAIN)  # trusted domain, no rights anywhere
SCANNER = spiffe_id("scanner", PARTNER_DOMAIN)  # trusted domain, on the threat list
INTRUDER = spiffe_id("frontend", UNTRUSTED_DOMAIN)  # claims to be "frontend", from evil.org
WORKLOADS = (FRONTEND, ORDERS, PAYMENTS, AUDITOR, SCANNER, INTRUDER)
DELEGATION_ACTORS = (FRONTEND,)  # may present a user's session on the user's behalf
EXCHANGE_RULES = ((ORDERS, (EXCHANGE_AUDIENCE,), ("payments:write",)),)  # actor, audiences, scopes

# Threat-intelligence entries of the evaluated world (one of each kind the lists support).
THREAT_SUBJECTS = ("mallory",)
THREAT_WORKLOADS = (SCANNER,)
THREAT_NETWORK = "10.66.6.0/24"


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as a client sends it to a service of the mesh.

    ``workload`` is the client's SPIFFE ID, proven with its X.509-SVID over mTLS (None: a client
    without a certificate, such as a browser). ``door`` picks a listener when a target has more
    than one per service (``lenient``: a sidecar misconfigured to trust every CA). ``at`` is the
    time of the request where a target runs on simulated time (the in-process pipeline)."""

    service: str
    method: str
    path: str  # the request target exactly as sent (path and query), tricks included
    workload: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    source: str = "10.0.0.10"
    user_agent: str = USER_AGENT
    door: str = ""
    at: float | None = None

    def with_headers(self, **headers: str) -> "Request":
        extra = tuple((k.replace("_", "-"), v) for k, v in headers.items())
        return Request(self.service, self.method, self.path, self.workload, self.headers + extra, self.source,
                       self.user_agent, self.door, self.at)

    def describe(self) -> str:
        who = self.workload or f"plain client {self.source}"
        presented = ", ".join(sorted({k for k, _ in self.headers})) or "no credentials"
        return f"{self.method} {self.service}{self.path} from {who} ({presented})"


@dataclass(slots=True)
class Outcome:
    """What the client got back. ``reached`` is True when the service behind the proxy answered
    (the request was let through); ``upstream_path`` is the path that service received."""

    status: int  # 0 when no HTTP answer came (TLS handshake refused, connection reset)
    reached: bool = False
    code: str = ""  # authz-server's error code from a denial's body, when there is one
    decision_id: str = ""
    session_id: str = ""  # a new session id handed to the client (x-session-id)
    upstream_path: str = ""
    tls_refused: bool = False
    redirects: int = 0
    note: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.reached and 200 <= self.status < 300


def error_code(body: bytes | str) -> str:
    """authz-server's denial body is ``{"error": code, ...}``; anything else has no code."""
    try:
        document: Any = json.loads(body)
    except (ValueError, TypeError):
        return ""
    return str(document.get("error", "")) if isinstance(document, dict) else ""
