"""Who is calling: the workload, then the user (session or token), verified.

``IdentityService.resolve`` (``resolver``) reads ``Facts`` into a verified ``Identity``
(``verified``) for the pipeline: the workload from its SPIFFE certificate (``workloads``,
``spiffe``), then a session (``sessions``, where every session is minted by
``mint_session``; ``redis_store`` shares them between replicas) or a token, verified in
``tokens`` (``verify_jws``, then ``validate_claims``) with the issuers' keys (``oidc``,
``jwks``, ``keysources``) and, for bound tokens, a DPoP proof (``dpop``). Browser sign-in
(``browser``) and RFC 8693 token exchange (``exchange``) mint sessions and tokens. Nothing
here imports a transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time each name is imported on first use
    from .browser import BrowserLogin, BrowserLoginConfig
    from .dpop import DpopSettings, ProofChecker
    from .exchange import ExchangeConfig, ExchangeSigner, TokenExchange
    from .oidc import IssuerConfig, IssuerRegistry, parse_issuers
    from .redis_store import RedisStore
    from .resolver import IdentityService, SessionSettings, TokenValidator
    from .sessions import MemoryStore, Session, SessionStore, mint_session, session_key
    from .tokens import IssuerPolicy, VerifiedToken, validate_claims, validate_jwt, verify_jws
    from .verified import IDENTITY_HEADERS, Identity, NO_IDENTITY, upstream_removals
    from .workloads import PrincipalVerifier, WorkloadIdentity, WorkloadVerifier

_FROM = {
    "browser": ("BrowserLogin", "BrowserLoginConfig"),
    "dpop": ("DpopSettings", "ProofChecker"),
    "exchange": ("ExchangeConfig", "ExchangeSigner", "TokenExchange"),
    "oidc": ("IssuerConfig", "IssuerRegistry", "parse_issuers"),
    "redis_store": ("RedisStore",),
    "resolver": ("IdentityService", "SessionSettings", "TokenValidator"),
    "sessions": ("MemoryStore", "Session", "SessionStore", "mint_session", "session_key"),
    "tokens": ("IssuerPolicy", "VerifiedToken", "validate_claims", "validate_jwt", "verify_jws"),
    "verified": ("IDENTITY_HEADERS", "Identity", "NO_IDENTITY", "upstream_removals"),
    "workloads": ("PrincipalVerifier", "WorkloadIdentity", "WorkloadVerifier"),
}
__getattr__ = lazy_exports(__name__, _FROM)

__all__ = [
    "BrowserLogin", "BrowserLoginConfig", "DpopSettings", "ExchangeConfig", "ExchangeSigner",
    "IDENTITY_HEADERS", "Identity", "IdentityService", "IssuerConfig", "IssuerPolicy", "IssuerRegistry",
    "MemoryStore", "NO_IDENTITY", "PrincipalVerifier", "ProofChecker", "RedisStore", "Session",
    "SessionSettings", "SessionStore", "TokenExchange", "TokenValidator", "VerifiedToken", "WorkloadIdentity",
    "WorkloadVerifier", "mint_session", "parse_issuers", "session_key", "upstream_removals", "validate_claims",
    "validate_jwt", "verify_jws",
]
