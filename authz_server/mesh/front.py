"""Render a front-proxy Envoy config: one listener, optional ext_authz, routes to an upstream.

Used by the quick demo, the end-to-end tests and the benchmarks (which also render the
"Envoy alone" and "Envoy + native RBAC" set-ups from here, so the three differ in exactly
one filter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .extauthz import (ROUTER, AuthzTarget, authz_cluster, ext_authz_filter, hcm_path_safety, per_route_context,
                       socket_address, static_cluster)


@dataclass(frozen=True)
class Route:
    prefix: str = "/"
    context_extensions: dict[str, str] = field(default_factory=dict)
    direct_response: str | None = None  # answer here with this body instead of proxying
    response_headers: tuple[tuple[str, str], ...] = ()  # added to every answer (Envoy's %REQ(...)% works)


@dataclass(frozen=True)
class FrontProxy:
    upstream: str = ""  # host:port or unix:/path; empty when every route answers directly
    listen: str = "127.0.0.1:0"
    authz: AuthzTarget | None = None
    routes: tuple[Route, ...] = (Route(),)
    rbac: dict[str, Any] | None = None  # an envoy.extensions.filters.http.rbac.v3.RBAC config
    listener_name: str = "ingress"
    stats_prefix: str = "ingress"
    tls: tuple[str, str] | None = None  # (certificate chain file, private key file): an https listener


def _route(route: Route) -> dict[str, Any]:
    rendered: dict[str, Any] = {"match": {"prefix": route.prefix}}
    if route.direct_response is not None:
        rendered["direct_response"] = {"status": 200, "body": {"inline_string": route.direct_response}}
    else:
        rendered["route"] = {"cluster": "upstream", "timeout": "10s"}
    if route.context_extensions:
        rendered["typed_per_filter_config"] = per_route_context(route.context_extensions)
    if route.response_headers:
        rendered["response_headers_to_add"] = [{"header": {"key": k, "value": v}} for k, v in route.response_headers]
    return rendered


def render_front_proxy(proxy: FrontProxy) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if proxy.rbac is not None:
        filters.append({"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", **proxy.rbac}})
    if proxy.authz is not None:
        filters.append(ext_authz_filter(proxy.authz))
    filters.append(ROUTER)
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": proxy.stats_prefix,
        "codec_type": "AUTO",
        **hcm_path_safety(),
        "route_config": {"name": "local", "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [_route(r) for r in proxy.routes]}]},
        "http_filters": filters,
    }
    clusters = []
    if proxy.upstream:
        clusters.append(static_cluster("upstream", proxy.upstream))
    if proxy.authz is not None:
        clusters.append(authz_cluster(proxy.authz))
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                          "typed_config": hcm}]}
    if proxy.tls is not None:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {"tls_certificates": [{"certificate_chain": {"filename": proxy.tls[0]},
                                                         "private_key": {"filename": proxy.tls[1]}}]},
        }}
    return {"static_resources": {
        "listeners": [{"name": proxy.listener_name, "address": socket_address(proxy.listen),
                       "filter_chains": [chain]}],
        "clusters": clusters,
    }}
