"""The Envoy configs committed under ``envoy/``, rendered from the same code the demo and
tests use. ``authz-server render-configs`` rewrites them; a test checks they are current
and that Envoy accepts each one (``envoy --mode validate``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from .extauthz import AuthzTarget
from .front import FrontProxy, Route, render_front_proxy

HEADER = ("# Rendered by `authz-server render-configs` from authz_server/mesh/; edit the code, not this file.\n"
          "# {what}\n")


def front_proxy_configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """Front-proxy examples for users putting authz-server behind their own Envoy."""
    listen = "0.0.0.0:8000"
    upstream = "upstream:8080"
    routes = (Route("/admin", context_extensions={"sensitivity": "high"}),
              Route("/", context_extensions={"sensitivity": "low"}))
    grpc = render_front_proxy(FrontProxy(upstream=upstream, listen=listen, routes=routes,
                                         authz=AuthzTarget("authz-server:9191", with_request_body=True)))
    http = render_front_proxy(FrontProxy(upstream=upstream, listen=listen, routes=routes[1:],
                                         authz=AuthzTarget("authz-server:9192", mode="http", with_request_body=True,
                                                           http_headers_to_add=(("x-authz-ctx-sensitivity", "low"),))))
    for config in (grpc, http):
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}
    return {
        "front-grpc.yaml": ("Front proxy asking authz-server over ext_authz gRPC (richest attributes, per-route "
                            "context_extensions).", grpc),
        "front-http.yaml": ("Front proxy asking authz-server over Envoy's HTTP ext_authz protocol (the fast mode; "
                            "route settings as x-authz-ctx-* headers).", http),
    }


def rendered_files() -> dict[str, str]:
    files: dict[str, str] = {}
    for name, (what, config) in front_proxy_configs().items():
        files[name] = HEADER.format(what=what) + yaml.safe_dump(config, sort_keys=False)
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="envoy", help="folder to write into (default: envoy/)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered_files().items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0
