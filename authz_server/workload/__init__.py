"""The dev SPIFFE issuer: a stand-in for the SPIRE agent, for laptops and tests. DEVELOPMENT ONLY.

One CA per trust domain (keys on disk, 0600), X.509-SVIDs and JWT-SVIDs per the SPIFFE
standards, rotation at half-life, federation through SPIFFE bundle documents, and a Unix
socket per registered workload that serves both the SPIFFE Workload API and Envoy SDS with
SPIRE's resource names. See docs/workload.md.

Public API::

    config = IdentityConfig.from_yaml("identity.yaml")      # or IdentityConfig.from_mapping(data, base_dir=...)
    async with IdentityServer(config) as identity:          # sockets serve once this returns
        identity.sockets                                    # {workload name: socket path}
        identity.snapshot("frontend").svid                  # the X509Svid being served
        await identity.rotate_now("frontend")               # re-issue now and push (None: all); -> count
        await identity.rotate_ca("example.org", activate_after=5)  # new CA in bundles now, signs 5 s later

    with IdentityServerThread(config) as identity:          # the same, from synchronous code
        identity.rotate_now()                               # (blocking wrappers, no await)

Command line: ``authz-server identity serve --config FILE``.
"""

from __future__ import annotations

from .bundle import BundleError, TrustBundle, parse_spiffe_bundle
from .config import IdentityConfig, TrustDomainConfig, WorkloadConfig
from .issuer import Issuer, WorkloadSnapshot
from .sds import ALL_BUNDLES_NAME, DEFAULT_BUNDLE_NAME, DEFAULT_SVID_NAME
from .server import IdentityServer, IdentityServerThread
from .svid import JwtSvid, SvidError, ValidatedJwtSvid, X509Svid

__all__ = [
    "ALL_BUNDLES_NAME", "BundleError", "DEFAULT_BUNDLE_NAME", "DEFAULT_SVID_NAME", "IdentityConfig", "IdentityServer",
    "IdentityServerThread", "Issuer", "JwtSvid", "SvidError", "TrustBundle", "TrustDomainConfig", "ValidatedJwtSvid",
    "WorkloadConfig", "WorkloadSnapshot", "X509Svid", "parse_spiffe_bundle",
]
