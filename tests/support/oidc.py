"""The real OpenID provider of the end-to-end tests (``oidc-provider`` on Node.js), set up with
the clients, accounts and resource servers the tests use; skipped, with the reason, where it
cannot run."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from authz_server.mesh.oidcprovider import OidcProvider, unavailable_reason
from authz_server.mesh.processes import Supervisor

ORDERS = "urn:example:orders"  # JWT access tokens, aud "orders"
LEDGER = "urn:example:ledger"  # opaque access tokens (introspection), aud "ledger"
ACCOUNTS = {"alice": {"password": "wonderland", "claims": {"name": "Alice", "email": "alice@example.org",
                                                            "roles": ["buyer"]}},
            "mallory": {"password": "mallory-pw", "claims": {"name": "Mallory"}}}


def needs_oidc_provider() -> pytest.MarkDecorator:
    reason = unavailable_reason()
    return pytest.mark.skipif(reason is not None, reason=f"oidc-provider cannot run here: {reason}")


def start_provider(supervisor: Supervisor, workdir: Path, *, redirect_origins: tuple[str, ...] = (),
                   client_secret: str | None = None, extra_clients: tuple[dict[str, object], ...] = (),
                   **overrides: object) -> tuple[OidcProvider, dict[str, str]]:
    """A provider with three clients: ``authz-server`` (browser sign-in, introspection), ``shop``
    (client credentials, refresh tokens, DPoP) and ``bound`` (certificate-bound tokens).
    Returns it and the clients' secrets."""
    secrets_by_client = {"authz-server": client_secret or secrets.token_urlsafe(32),
                         "shop": secrets.token_urlsafe(32), "bound": secrets.token_urlsafe(32)}
    common = {"token_endpoint_auth_method": "client_secret_basic", "introspection_signed_response_alg": "ES256"}
    clients = [
        {"client_id": "authz-server", "client_secret": secrets_by_client["authz-server"],
         "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
         "redirect_uris": [f"{o}/_authz/callback" for o in redirect_origins] or ["https://app.test/_authz/callback"],
         "post_logout_redirect_uris": [f"{o}/" for o in redirect_origins] or ["https://app.test/"], **common},
        {"client_id": "shop", "client_secret": secrets_by_client["shop"],
         "grant_types": ["client_credentials", "authorization_code", "refresh_token"], "response_types": ["code"],
         "redirect_uris": ["https://shop.test/cb"], **common},
        {"client_id": "bound", "client_secret": secrets_by_client["bound"], "grant_types": ["client_credentials"],
         "response_types": [], "redirect_uris": [], "tls_client_certificate_bound_access_tokens": True, **common},
    ]
    clients += list(extra_clients)
    resources = {ORDERS: {"audience": "orders", "scope": "orders:read orders:write", "format": "jwt"},
                 LEDGER: {"audience": "ledger", "scope": "ledger:read", "format": "opaque"}}
    provider = OidcProvider(supervisor, workdir, clients=clients, accounts=ACCOUNTS, resources=resources,
                            default_resource=ORDERS, **overrides)  # type: ignore[arg-type]
    provider.start()
    return provider, secrets_by_client
