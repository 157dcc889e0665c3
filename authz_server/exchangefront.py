"""The token exchange's HTTP endpoint: ``POST /token`` and the discovery documents.

Reads what ``identity.exchange.TokenExchange`` needs from the request — the form, and the
actor from its mTLS client certificate (or, behind a sidecar that is trusted to, from
``x-forwarded-client-cert``) — and writes its answer or its RFC 6749 error as JSON. The
exchange itself stays on plain values, so identity imports no transport.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.parse

from .http import HttpRequest, HttpResponse, json_response
from .httpfront import XFCC, parse_xfcc
from .identity.encoding import b64url_encode
from .identity.exchange import GRANT_TYPE, MAX_FORM_BYTES, ExchangeError, TokenExchange
from .identity.workloads import der_sha256
from .tls import spiffe_id_of

log = logging.getLogger("authz_server.exchange")  # the exchange's own logger name, as before the split


class ExchangeEndpoint:
    """``handle`` is what ``http.serve_http`` calls for each request on the exchange's address."""

    def __init__(self, exchange: TokenExchange) -> None:
        self.exchange = exchange

    async def handle(self, request: HttpRequest) -> HttpResponse:
        exchange = self.exchange
        config = exchange.config
        if request.path in ("/.well-known/jwks.json", "/jwks"):
            return json_response(200, exchange.signer.jwks)
        if request.path == "/.well-known/openid-configuration":
            base = config.issuer.rstrip("/")
            return json_response(200, {"issuer": config.issuer, "token_endpoint": f"{base}/token",
                                       "jwks_uri": f"{base}/.well-known/jwks.json",
                                       "grant_types_supported": [GRANT_TYPE]})
        if request.path != "/token":
            return json_response(404, {"error": "not_found", "error_description": "POST /token"})
        if request.method != "POST":
            return json_response(405, {"error": "invalid_request", "error_description": "use POST"},
                                 [("allow", "POST")])
        try:
            answer = await exchange.exchange(_form(request), self._actor(request))
        except ExchangeError as exc:
            exchange.refused += 1
            log.info("token exchange refused (%s): %s", exc.code, exc.message)
            headers = [("www-authenticate", "mTLS")] if exc.status == 401 else []
            return json_response(exc.status, {"error": exc.code, "error_description": exc.message},
                                 [("pragma", "no-cache"), *headers])
        exchange.issued += 1
        return json_response(200, answer, [("pragma", "no-cache")])

    def _actor(self, request: HttpRequest) -> tuple[str, str]:
        """The caller's SPIFFE ID and certificate thumbprint (x5t#S256)."""
        if request.peer_certificate:
            spiffe_id = spiffe_id_of(request.peer_certificate)
            if spiffe_id:
                return spiffe_id, b64url_encode(hashlib.sha256(request.peer_certificate).digest())
        if self.exchange.config.trust_forwarded_client_cert and XFCC in request.headers:
            xfcc = parse_xfcc(request.headers[XFCC])
            if xfcc.get("uri", "").startswith("spiffe://") and xfcc.get("cert"):
                thumb = b64url_encode(bytes.fromhex(der_sha256(xfcc["cert"])))
                return xfcc["uri"], thumb
        raise ExchangeError("invalid_client", "the actor must present a client certificate with a SPIFFE ID",
                            status=401)


def _form(request: HttpRequest) -> dict[str, str]:
    content_type = request.headers.get("content-type", "")
    if "application/x-www-form-urlencoded" not in content_type:
        raise ExchangeError("invalid_request", "send the parameters form-encoded")
    if len(request.body) > MAX_FORM_BYTES:
        raise ExchangeError("invalid_request", "request too large")
    try:
        pairs = urllib.parse.parse_qsl(request.body.decode("utf-8"), strict_parsing=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise ExchangeError("invalid_request", "malformed form body") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:  # RFC 6749 §3.2: parameters MUST NOT be included more than once
            raise ExchangeError("invalid_request", "a parameter is given more than once")
        form[key] = value
    return form


__all__ = ["ExchangeEndpoint"]
