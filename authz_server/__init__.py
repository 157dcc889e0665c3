"""authz-server: zero-trust authorization for Envoy ext_authz."""

import warnings

# py-spiffe 0.3.2 names cryptography's DSA key type when its JWT bundle module is imported, and
# cryptography >= 48 warns on that name. We never use DSA keys (SPIFFE allows none); the one
# warning is silenced for that module only, so every other warning still reaches the user.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"spiffe\.")
