"""The policy: Rego evaluated by OPA itself, loaded, tested and swapped atomically.

``PolicyRuntime`` (``loader``) loads a policy set (``source``: a folder or bundles), compiles
it, runs its own tests as the reload gate (``testing``) and serves the last good one as
``ActivePolicy``. ``engine`` is the one module that imports OPA; ``pool`` runs evaluations
on threads; ``inputs`` finds what part of ``input`` the policy reads; ``explain``
summarises OPA's trace; ``cli`` is ``authz-server policy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time each name is imported on first use
    from .engine import CompiledPolicy, UNDEFINED, validate_query
    from .inputs import input_paths
    from .loader import ActivePolicy, PolicyRuntime
    from .source import CacheSettings, PolicySet, load_policy_set
    from .testing import RequestReader, TestReport, check_tests, run_policy_tests

_FROM = {
    "engine": ("CompiledPolicy", "UNDEFINED", "validate_query"),
    "inputs": ("input_paths",),
    "loader": ("ActivePolicy", "PolicyRuntime"),
    "source": ("CacheSettings", "PolicySet", "load_policy_set"),
    "testing": ("RequestReader", "TestReport", "check_tests", "run_policy_tests"),
}
__getattr__ = lazy_exports(__name__, _FROM)

__all__ = [
    "ActivePolicy", "CacheSettings", "CompiledPolicy", "PolicyRuntime", "PolicySet", "RequestReader",
    "TestReport", "UNDEFINED", "check_tests", "input_paths", "load_policy_set", "run_policy_tests",
    "validate_query",
]
