"""Where a request carries its credentials, read with size caps.

* a bearer token in ``Authorization: Bearer <jwt>``;
* a session id in ``x-session-id``, or in the ``__Host-authz-session`` cookie on
  browser-facing routes;
* the user agent, when sessions are bound to it.
"""

from __future__ import annotations

from ..errors import SessionError, TokenError
from ..facts import Facts

SESSION_HEADER = "x-session-id"
SESSION_COOKIE = "__Host-authz-session"
MAX_TOKEN_BYTES = 16 * 1024
MAX_SESSION_ID_CHARS = 128


def bearer_token(facts: Facts) -> str | None:
    header = facts.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = value.strip()
    if not token:
        raise TokenError("empty bearer token", code="malformed_token")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(f"bearer token over {MAX_TOKEN_BYTES} bytes", code="token_too_large")
    return token


def session_id(facts: Facts, cookie_name: str = SESSION_COOKIE) -> str | None:
    value = facts.headers.get(SESSION_HEADER)
    if value is None:
        value = _cookie(facts.headers.get("cookie", ""), cookie_name)
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_SESSION_ID_CHARS:
        raise SessionError("malformed session id", code="malformed_session_id")
    return value


def _cookie(header: str, name: str) -> str | None:
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def user_agent(facts: Facts) -> str:
    return facts.headers.get("user-agent", "")
