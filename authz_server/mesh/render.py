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
from .sidecar import Outbound, Sidecar, render_sidecar, routes_from_policy_data

POLICY_DATA = Path(__file__).resolve().parents[2] / "policies" / "data.yaml"
# docker-compose.yml: each app shares its sidecar's network namespace (network_mode:
# service:<name>-sidecar), so the app is on loopback and peers are reached by sidecar name.
COMPOSE_SDS_SOCKET = "/run/spire/sockets/agent.sock"
COMPOSE_AUTHZ = "authz-server:9191"
COMPOSE_OUTBOUND_PORTS = {"orders": 9001, "payments": 9002}
COMPOSE_CALLS = {"frontend": ("orders", "payments"), "orders": ("payments",), "payments": ()}

HEADER = ("# Rendered by `authz-server render-configs` from authz_server/mesh/; edit the code, not this file.\n"
          "# {what}\n")


def front_proxy_configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """Front-proxy examples for users putting authz-server behind their own Envoy: in containers
    (``authz-server``, ``upstream`` by name, the shipped policy's ``frontend`` service), and on
    one machine (everything on loopback, the README's ``examples/local`` policy)."""
    configs: dict[str, tuple[str, dict[str, Any]]] = {}
    for prefix, where, listen, upstream, authz_host in (
            ("front", "containers (compose, Kubernetes)", "0.0.0.0:8000", "upstream:8080", "authz-server"),
            ("local", "one machine: everything on 127.0.0.1 (README: Behind your own Envoy)", "127.0.0.1:8000",
             "127.0.0.1:8080", "127.0.0.1")):
        context = {"service": "frontend"}
        routes = (Route("/admin", context_extensions={**context, "sensitivity": "high"}),
                  Route("/", context_extensions={**context, "sensitivity": "low"}))
        grpc = render_front_proxy(FrontProxy(upstream=upstream, listen=listen, routes=routes,
                                             authz=AuthzTarget(f"{authz_host}:9191", with_request_body=True)))
        # HTTP mode forwards only the policy headers Envoy is told of: the local example's too.
        forwarded = AuthzTarget("").allowed_upstream_headers + (("x-checked-by",) if prefix == "local" else ())
        http = render_front_proxy(FrontProxy(upstream=upstream, listen=listen, routes=routes[1:],
                                             authz=AuthzTarget(f"{authz_host}:9192", mode="http",
                                                               with_request_body=True, http_headers_to_add=(
                                                                   ("x-authz-ctx-service", "frontend"),
                                                                   ("x-authz-ctx-sensitivity", "low")),
                                                               allowed_upstream_headers=forwarded)))
        for config in (grpc, http):
            config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}
        configs[f"{prefix}-grpc.yaml"] = (f"Front proxy for {where}, asking authz-server over ext_authz gRPC (richest "
                                          "attributes, per-route context_extensions).", grpc)
        configs[f"{prefix}-http.yaml"] = (f"Front proxy for {where}, asking authz-server over Envoy's HTTP ext_authz "
                                          "protocol (the fast mode; route settings as x-authz-ctx-* headers).", http)
    return configs


def compose_sidecar_configs(policy_data: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The compose mesh's sidecars: the same template the embedded mesh renders, SPIRE's socket."""
    configs = {}
    for service, peers in COMPOSE_CALLS.items():
        sidecar = Sidecar(
            service=service, spiffe_id=f"spiffe://example.org/{service}", sds_socket=COMPOSE_SDS_SOCKET,
            app="127.0.0.1:8080", authz=AuthzTarget(COMPOSE_AUTHZ), authz_spiffe_id="spiffe://example.org/authz-server",
            routes=routes_from_policy_data(policy_data, service), inbound="0.0.0.0:8443",
            public="0.0.0.0:8000" if service == "frontend" else "",
            outbound=tuple(Outbound(peer, f"127.0.0.1:{COMPOSE_OUTBOUND_PORTS[peer]}", f"{peer}-sidecar:8443",
                                    f"spiffe://example.org/{peer}") for peer in peers))
        config = render_sidecar(sidecar)
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}
        configs[f"compose/{service}.yaml"] = (
            f"The {service} sidecar of docker-compose.yml: SVID and bundles from the SPIRE agent's SDS socket, "
            "every inbound request checked by authz-server.", config)
    return configs


def rendered_files(policy_data_file: Path = POLICY_DATA) -> dict[str, str]:
    files: dict[str, str] = {}
    policy_data = yaml.safe_load(policy_data_file.read_text())
    for name, (what, config) in {**front_proxy_configs(), **compose_sidecar_configs(policy_data)}.items():
        files[name] = HEADER.format(what=what) + yaml.safe_dump(config, sort_keys=False)
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="envoy", help="folder to write into (default: envoy/)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered_files().items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0
