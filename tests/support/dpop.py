"""A DPoP client's side (RFC 9449 §4): a key pair and the proof it signs for each request."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from authz_server.identity.encoding import b64url_encode
from authz_server.identity.jose import public_jwk, thumbprint


@dataclass
class DpopClient:
    private_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    alg: str = "ES256"

    @property
    def jwk(self) -> dict[str, Any]:
        full = public_jwk(self.private_key.public_key())
        return {k: full[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in full}

    @property
    def jkt(self) -> str:
        return thumbprint(self.jwk)

    def proof(self, method: str, url: str, *, token: str | None = None, nonce: str | None = None,
              iat: float | None = None, jti: str | None = None, header: dict[str, Any] | None = None,
              claims: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"jti": jti or secrets.token_urlsafe(16), "htm": method, "htu": url,
                                "iat": int(time.time() if iat is None else iat)}
        if token is not None:
            body["ath"] = b64url_encode(hashlib.sha256(token.encode()).digest())
        if nonce is not None:
            body["nonce"] = nonce
        body.update(claims or {})
        head = {"typ": "dpop+jwt", "jwk": self.jwk, **(header or {})}
        return jwt.encode({k: v for k, v in body.items() if v is not None}, self.private_key, algorithm=self.alg,
                          headers={k: v for k, v in head.items() if v is not None})
