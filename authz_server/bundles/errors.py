"""Why a bundle was refused: one branch of the ``AuthzError`` tree (under ``PolicyError``,
since a refused bundle is a policy that cannot serve).

Codes (stable; they reach the status API, the logs and ``authz_policy_reloads``):
``bundle_unreadable`` (not a gzip tar, truncated, a link or ``..`` in a path, too large),
``bundle_invalid`` (manifest, roots, data layout, an unsupported file such as a delta patch or
Wasm), ``bundle_unsigned`` (signing is required and there is no ``.signatures.json``),
``bundle_signature_invalid`` (the JWT is malformed or its signature does not verify),
``bundle_key_unknown`` (no key id, or no configured key for it), ``bundle_key_invalid`` (the
configured key or algorithm cannot be used), ``bundle_scope_mismatch``,
``bundle_file_not_signed`` (a file the signature does not list), ``bundle_digest_mismatch``,
``bundle_file_missing`` (the signature lists a file the bundle lacks),
``bundle_roots_overlap`` (two bundles claim the same part of ``data``),
``bundle_download_failed`` (HTTP error, timeout, connection refused).
"""

from __future__ import annotations

from ..errors import PolicyError


class BundleError(PolicyError):
    default_code = "bundle_invalid"
