"""authz-server: zero-trust authorization for Envoy ext_authz.

The nouns and the one verb of a decision (docs/architecture.md draws the rest): the fronts
read a request into ``Facts``; ``Pipeline.decide(facts, now=...)`` resolves the caller's
``Identity``, asks the policy and answers a ``Decision`` (the policy's own answer read as a
``Verdict``); ``Config`` is the server's configuration file (``load_config``); every error
is an ``AuthzError`` with a stable code, one branch per phase.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .exports import lazy_exports

# py-spiffe 0.3.2 names cryptography's DSA key type when its JWT bundle module is imported, and
# cryptography >= 48 warns on that name. We never use DSA keys (SPIFFE allows none); the one
# warning is silenced for that module only, so every other warning still reaches the user.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"spiffe\.")

if TYPE_CHECKING:  # for readers and type checkers; at run time each name is imported on first use
    from .config import Config, load_config
    from .decision import Decision, Pipeline
    from .errors import (AuthzError, ConfigError, IdentityError, PolicyError, ReplayError, RequestError, SessionError,
                         TokenError, UnavailableError, WorkloadError)
    from .facts import Facts
    from .identity.verified import Identity
    from .response import Verdict

_FROM = {
    "config": ("Config", "load_config"),
    "decision": ("Decision", "Pipeline"),
    "errors": (
        "AuthzError", "ConfigError", "IdentityError", "PolicyError", "ReplayError", "RequestError",
        "SessionError", "TokenError", "UnavailableError", "WorkloadError",
    ),
    "facts": ("Facts",),
    "identity.verified": ("Identity",),
    "response": ("Verdict",),
}
__getattr__ = lazy_exports(__name__, _FROM)

__all__ = [
    "AuthzError", "Config", "ConfigError", "Decision", "Facts", "Identity", "IdentityError", "Pipeline", "PolicyError",
    "ReplayError", "RequestError", "SessionError", "TokenError", "UnavailableError", "Verdict", "WorkloadError",
    "load_config",
]
