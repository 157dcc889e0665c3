"""The demo mesh: real Envoy sidecars, upstreams and authz-server, started on one machine.

``running_mesh`` (``launcher``) starts a ``Mesh`` from ``MeshOptions``: the identity
issuer, the sidecars and front proxy (``sidecar``, ``front``, rendered by ``render``),
the upstream services and an OIDC provider; ``tour``/``meshtour`` and ``signin_demo`` walk
through it. ``demo`` is ``authz-server demo``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time each name is imported on first use
    from .demo import mesh_demo
    from .launcher import Mesh, MeshOptions, running_mesh
    from .tour import run_tour

_FROM = {
    "demo": ("mesh_demo",),
    "launcher": ("Mesh", "MeshOptions", "running_mesh"),
    "tour": ("run_tour",),
}
__getattr__ = lazy_exports(__name__, _FROM)

__all__ = [
    "Mesh", "MeshOptions", "mesh_demo", "run_tour", "running_mesh",
]
