"""One exception tree for every way a check can fail.

Each error carries a short, stable ``code``: it becomes the audit record's reason, the
metrics label and the denied body, so operators can count and grep by it. The branch an
error sits on decides the answer Envoy gets (see ``status``)::

    AuthzError
    ├── RequestError        400  the CheckRequest itself is malformed or too large
    ├── IdentityError       401  who is calling could not be established
    │   ├── TokenError           JWT rejected (signature, claims, header, size)
    │   ├── SessionError         session id unknown, expired, revoked or bound elsewhere
    │   ├── WorkloadError        SPIFFE ID missing, malformed or from an untrusted domain
    │   └── ReplayError          token already used by a different client
    ├── PolicyError         403  the policy could not produce a usable decision
    ├── UnavailableError    503  a dependency (session store, key set) is down: fail closed
    └── ConfigError              the configuration is invalid; never raised per request

Verifiers raise these; only the decision pipeline turns them into a denied ``Decision``.
Third-party exceptions (pyjwt, the OPA bindings, redis) are translated where they are caught.
"""

from __future__ import annotations

import traceback
from pathlib import Path


class AuthzError(Exception):
    """Root of the tree: ``code`` is stable, ``message`` is for humans."""

    status: int = 403
    default_code: str = "authz_error"

    def __init__(self, message: str = "", *, code: str | None = None,
                 headers: tuple[tuple[str, str], ...] = (), status: int | None = None) -> None:
        self.code = code or self.default_code
        self.message = message or self.code.replace("_", " ")
        # Sent with the denial: a challenge (``WWW-Authenticate: DPoP ...``) or, with a 3xx
        # ``status``, a redirect (browser sign-in). Never request-supplied values.
        self.headers = headers
        if status is not None:
            self.status = status
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class RequestError(AuthzError):
    status = 400
    default_code = "bad_request"


class IdentityError(AuthzError):
    status = 401
    default_code = "unauthenticated"


class TokenError(IdentityError):
    default_code = "invalid_token"


class SessionError(IdentityError):
    default_code = "invalid_session"


class WorkloadError(IdentityError):
    default_code = "invalid_workload"


class ReplayError(IdentityError):
    default_code = "token_replay"


class PolicyError(AuthzError):
    status = 403
    default_code = "policy_error"


class UnavailableError(AuthzError):
    status = 503
    default_code = "unavailable"


class ConfigError(AuthzError):
    """A configuration problem; ``key`` names the offending setting."""

    default_code = "config_invalid"

    def __init__(self, message: str, *, key: str = "", code: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message, code=code)


def where_it_failed(exc: BaseException) -> str:
    """An unexpected exception as the server log may carry it: its type and the frames it
    passed through, without its message or any value. A message can quote the request
    (``int()`` quotes the text it could not read, ``KeyError`` its key), and the log must
    never hold what a request carried (issue 23). The code location is what a fix needs."""
    frames = traceback.extract_tb(exc.__traceback__)
    path = " <- ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in reversed(frames))
    return f"{type(exc).__name__} at {path or 'an unknown place'}"
