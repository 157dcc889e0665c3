"""A small, honest OIDC provider for development and the embedded demo. DEVELOPMENT ONLY.

It stands in for Keycloak where no Docker engine runs: real discovery, a real JWKS with key
rotation, a real token endpoint (client credentials and resource-owner password grants) and
real RFC 9068 access tokens, signed RS256 or ES256. It keeps demo users' passwords in plain
text, its keys in memory, and it says so in its startup log. Never point it at anything real.
"""

from __future__ import annotations

from .config import DemoClient, DemoUser, DevIdPConfig, load_devidp_config
from .keys import KeyRing, SigningKey, sign_jwt
from .provider import DevIdP, IssuedToken, OAuthError

__all__ = [
    "DemoClient", "DemoUser", "DevIdP", "DevIdPConfig", "IssuedToken", "KeyRing", "OAuthError", "SigningKey",
    "load_devidp_config", "sign_jwt",
]
