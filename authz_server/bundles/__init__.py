"""Policy bundles from an OPA control plane: download, verify, activate, report (docs/bundles.md).

``ControlPlaneClient`` (``plane``) wires the parts the config names (``config``): each
bundle is fetched by a ``Downloader`` (``download``, over a ``ServiceClient``,
``service``), its signatures checked (``signing``), read (``bundle``, ``archive``) and handed
to the ``BundleManager`` (``manager``) that activates it; ``status`` reports to the control
plane. ``server`` is a small control plane for tests and the demo; ``cli`` is
``authz-server bundle``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

if TYPE_CHECKING:  # for readers and type checkers; at run time each name is imported on first use
    from .bundle import Bundle, load_bundle
    from .config import ControlPlane, parse_control_plane
    from .download import Downloader
    from .errors import BundleError
    from .manager import BundleManager
    from .plane import ControlPlaneClient
    from .server import ControlPlaneServer
    from .service import ServiceClient
    from .signing import sign_files, verify_signatures
    from .status import StatusReporter

_FROM = {
    "bundle": ("Bundle", "load_bundle"),
    "config": ("ControlPlane", "parse_control_plane"),
    "download": ("Downloader",),
    "errors": ("BundleError",),
    "manager": ("BundleManager",),
    "plane": ("ControlPlaneClient",),
    "server": ("ControlPlaneServer",),
    "service": ("ServiceClient",),
    "signing": ("sign_files", "verify_signatures"),
    "status": ("StatusReporter",),
}
__getattr__ = lazy_exports(__name__, _FROM)

__all__ = [
    "Bundle", "BundleError", "BundleManager", "ControlPlane", "ControlPlaneClient", "ControlPlaneServer",
    "Downloader", "ServiceClient", "StatusReporter", "load_bundle", "parse_control_plane", "sign_files",
    "verify_signatures",
]
