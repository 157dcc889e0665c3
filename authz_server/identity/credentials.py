"""Where a request carries its credentials, read with size caps.

* an access token in ``Authorization: Bearer <token>``, or ``Authorization: DPoP <token>`` with
  its proof in the ``DPoP`` header (RFC 9449 §7.1);
* a session id in ``x-session-id``, or in the ``__Host-authz-session`` cookie on
  browser-facing routes (``context_extensions`` ``browser: "true"``) and nowhere else;
* the user agent, when sessions are bound to it.

A cookie travels with every request the browser makes, whoever made the page that sent it, and
can be planted by a sibling subdomain (RFC 6265 §8.6, §8.3): it is the weakest credential here.
So it counts only on the routes that said they serve browsers, and it never outranks a bearer
token (see ``resolver``): a token replaces whatever cookie came with it.
"""

from __future__ import annotations

from ..errors import SessionError, TokenError
from ..facts import Facts

SESSION_HEADER = "x-session-id"
SESSION_COOKIE = "__Host-authz-session"
MAX_TOKEN_BYTES = 16 * 1024
MAX_SESSION_ID_CHARS = 128


def bearer_token(facts: Facts) -> str | None:
    presented = access_token(facts)
    return presented[1] if presented is not None else None


def access_token(facts: Facts) -> tuple[str, str] | None:
    """``(scheme, token)``, scheme ``bearer`` or ``dpop`` (auth schemes are case-insensitive,
    RFC 9110 §11.1); None without one of those."""
    header = facts.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "dpop"):
        return None
    token = value.strip()
    if not token:
        raise TokenError("empty bearer token", code="malformed_token")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(f"bearer token over {MAX_TOKEN_BYTES} bytes", code="token_too_large")
    return scheme, token


def dpop_proof(facts: Facts) -> str | None:
    return facts.headers.get("dpop")


def request_uri(facts: Facts) -> str:
    """The URI the client called, as Envoy saw it (what a DPoP proof's ``htu`` names): the
    scheme Envoy recorded (``x-forwarded-proto``, which Envoy sets, else ``:scheme``), the
    ``:authority``, the path."""
    headers = facts.headers
    scheme = headers.get("x-forwarded-proto") or headers.get(":scheme")
    if not scheme and facts.transport == "grpc":
        scheme = facts.attributes().get("request", {}).get("http", {}).get("scheme")
    host = headers.get(":authority") or facts.host or headers.get("host", "")
    return f"{(scheme or 'https').split(',')[0].strip()}://{host}{facts.path}"


def is_browser_route(facts: Facts) -> bool:
    return facts.context_extensions.get("browser") == "true"


def session_header(facts: Facts) -> str | None:
    """The session id an API client sent in ``x-session-id``."""
    return _checked_id(facts.headers.get(SESSION_HEADER))


def session_cookie(facts: Facts, cookie_name: str = SESSION_COOKIE) -> str | None:
    """The session cookie, on browser routes only: elsewhere a cookie is not a credential."""
    if not is_browser_route(facts):
        return None
    return _checked_id(cookie_value(facts, cookie_name))


def cookie_value(facts: Facts, name: str) -> str | None:
    return _cookie(facts.headers.get("cookie", ""), name)


def _checked_id(value: str | None) -> str | None:
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
