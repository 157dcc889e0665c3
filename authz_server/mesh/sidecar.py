"""Render one service's Envoy sidecar: the same template for the embedded mesh and compose.

A sidecar has up to three kinds of listener:

* **inbound** (mTLS): peers must present an X.509-SVID from a trusted trust domain (Envoy's
  SPIFFE certificate validator, fed over SDS as SPIRE's ``ALL`` bundle set, so an unfederated
  domain is refused in the handshake); every request then goes through ext_authz with the
  route's ``service`` and ``sensitivity`` as context extensions. A service whose routes include
  a ``high`` one accepts TLS 1.3 only.
* **public** (plain HTTP, the frontend's door for users without an SVID): same routes, same check.
* **outbound** (plain HTTP on loopback, one per peer service): the app calls its peer here and
  the sidecar opens mTLS with this workload's SVID, accepting only the peer's SPIFFE ID.

Certificates and bundles come from SDS on one Unix socket, with SPIRE agent names (the
workload's SPIFFE ID, ``ALL``), so the socket may be SPIRE's or ``authz-server identity serve``'s.
The sidecar asks authz-server over mTLS too, expecting its SPIFFE ID.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .extauthz import ROUTER, AuthzTarget, authz_cluster, ext_authz_filter, hcm_path_safety, per_route_context, \
    http_protocol_options, socket_address, static_cluster

SDS_CLUSTER = "spiffe_workload_api"
ALL_BUNDLES = "ALL"  # SPIRE's default_all_bundles_name: own and federated trust domains
TLS_VERSION_HEADER = "x-authz-tls-version"
SENSITIVITY_ORDER = ("low", "medium", "high")
TLS_PARAMS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


@dataclass(frozen=True)
class SidecarRoute:
    prefix: str
    sensitivity: str = "medium"
    browser: bool = False  # the session also travels as a __Host- cookie on this route


@dataclass(frozen=True)
class Outbound:
    """Where the app reaches a peer service through this sidecar."""

    service: str
    listen: str  # plain HTTP, loopback
    address: str  # the peer sidecar's inbound mTLS listener
    spiffe_id: str  # the only identity accepted from that listener


@dataclass(frozen=True)
class Sidecar:
    service: str
    spiffe_id: str
    sds_socket: str  # path of the SPIFFE Workload API / SDS socket
    app: str  # host:port of the service behind this sidecar
    authz: AuthzTarget | None  # None: no check at all (the evaluation's baseline)
    routes: tuple[SidecarRoute, ...]
    inbound: str = ""  # mTLS listener; empty: none
    public: str = ""  # plain-HTTP listener for users; empty: none
    outbound: tuple[Outbound, ...] = ()
    authz_spiffe_id: str = ""  # when set, the sidecar asks authz-server over mTLS and expects this ID
    extra_context: dict[str, str] = field(default_factory=dict)
    mtls: bool = True  # False: plain HTTP between sidecars (the evaluation's baseline)
    # Connections to peers are renewed this often, so a rotated SVID is in use well before the
    # old one expires (Envoy keeps an open connection on the certificate it started with).
    max_connection_duration: str = "300s"

    @property
    def strongest_sensitivity(self) -> str:
        levels = [SENSITIVITY_ORDER.index(r.sensitivity) for r in self.routes if r.sensitivity in SENSITIVITY_ORDER]
        return SENSITIVITY_ORDER[max(levels, default=1)]


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]}}}


def _common_tls(sidecar: Sidecar, *, peer_ids: tuple[str, ...] = ()) -> dict[str, Any]:
    validation: dict[str, Any] = {}
    if peer_ids:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": peer}} for peer in peer_ids]
    return {
        "tls_certificate_sds_secret_configs": [_sds(sidecar.spiffe_id)],
        "combined_validation_context": {
            "default_validation_context": validation,
            "validation_context_sds_secret_config": _sds(ALL_BUNDLES),
        },
    }


def _downstream_tls(sidecar: Sidecar) -> dict[str, Any]:
    common = _common_tls(sidecar)
    # The sensitive service's door admits TLS 1.3 only; the others keep 1.2 for older clients.
    minimum = "TLSv1_3" if sidecar.strongest_sensitivity == "high" else "TLSv1_2"
    common["tls_params"] = {"tls_minimum_protocol_version": minimum, "tls_maximum_protocol_version": "TLSv1_3"}
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"{TLS_PARAMS}.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": common,
    }}


def _upstream_tls(sidecar: Sidecar, peer_id: str, *, alpn: tuple[str, ...] = ()) -> dict[str, Any]:
    common = _common_tls(sidecar, peer_ids=(peer_id,))
    # Envoy's upstream default stops at TLS 1.2, which a TLS-1.3-only (high) peer refuses.
    common["tls_params"] = {"tls_maximum_protocol_version": "TLSv1_3"}
    if alpn:
        common["alpn_protocols"] = list(alpn)
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"{TLS_PARAMS}.UpstreamTlsContext",
        "common_tls_context": common,
        # TLS 1.3 tickets are single-use: with Envoy's default of one kept key, new connections
        # opened together mostly find none (17 % resumed); 64 resume all of them, for 40 % less
        # handshake CPU (docs/benchmarks.md, "TLS handshakes between sidecars").
        "max_session_keys": 64,
    }}


def _tls_version_header() -> dict[str, Any]:
    """Tell the check which TLS version the caller negotiated, overwriting any client-sent value."""
    return {"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"append": {
            "header": {"key": TLS_VERSION_HEADER, "value": "%DOWNSTREAM_TLS_VERSION%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]},
    }}


def _checked_routes(sidecar: Sidecar) -> list[dict[str, Any]]:
    routes = list(sidecar.routes)
    if not any(r.prefix == "/" for r in routes):
        # Paths the table does not name still reach the check (and are refused there, logged),
        # instead of a silent 404 from Envoy that no audit record would show.
        routes.append(SidecarRoute("/", sidecar.strongest_sensitivity))
    rendered = []
    for route in sorted(routes, key=lambda r: -len(r.prefix)):
        context = {"service": sidecar.service, "sensitivity": route.sensitivity, **sidecar.extra_context}
        if route.browser:
            context["browser"] = "true"
        rendered.append({"match": {"prefix": route.prefix}, "route": {"cluster": "app", "timeout": "10s"},
                         "typed_per_filter_config": per_route_context(context)})
    return rendered


def _hcm(stat_prefix: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]], *,
         forward_client_cert: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        **hcm_path_safety(),
        "route_config": {"name": stat_prefix, "virtual_hosts": [{"name": stat_prefix, "domains": ["*"],
                                                                 "routes": routes}]},
        "http_filters": [*filters, ROUTER],
    }
    if forward_client_cert:
        # The app (and authz-server's HTTP mode) learn the caller from XFCC, set by Envoy only.
        config["forward_client_cert_details"] = "SANITIZE_SET"
        config["set_current_client_cert_details"] = {"uri": True, "cert": False}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _listener(name: str, address: str, hcm: dict[str, Any], transport: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [hcm]}
    if transport is not None:
        chain["transport_socket"] = transport
    return {"name": name, "address": socket_address(address), "filter_chains": [chain]}


def render_sidecar(sidecar: Sidecar) -> dict[str, Any]:
    checked_filters = [_tls_version_header(), ext_authz_filter(sidecar.authz)] if sidecar.authz else []
    listeners = []
    if sidecar.inbound:
        listeners.append(_listener("inbound", sidecar.inbound,
                                   _hcm("inbound", _checked_routes(sidecar), checked_filters,
                                        forward_client_cert=sidecar.mtls),
                                   _downstream_tls(sidecar) if sidecar.mtls else None))
    if sidecar.public:
        listeners.append(_listener("public", sidecar.public,
                                   _hcm("public", _checked_routes(sidecar), checked_filters, forward_client_cert=True)))
    clusters = [static_cluster("app", sidecar.app)]
    if sidecar.mtls:
        clusters.append(static_cluster(SDS_CLUSTER, "unix:" + sidecar.sds_socket, http2=True))
    if sidecar.authz is not None:
        authz = authz_cluster(sidecar.authz)
        if sidecar.authz_spiffe_id:
            authz["transport_socket"] = _upstream_tls(sidecar, sidecar.authz_spiffe_id, alpn=("h2",))
        clusters.append(authz)
    for peer in sidecar.outbound:
        cluster_name = f"peer_{peer.service}"
        route = {"match": {"prefix": "/"}, "route": {"cluster": cluster_name, "timeout": "10s"}}
        listeners.append(_listener(f"outbound_{peer.service}", peer.listen,
                                   _hcm(f"outbound_{peer.service}", [route], [], forward_client_cert=False)))
        cluster = static_cluster(cluster_name, peer.address)
        cluster["typed_extension_protocol_options"] = http_protocol_options(
            {"http_protocol_options": {}}, max_connection_duration=sidecar.max_connection_duration)
        if sidecar.mtls:
            cluster["transport_socket"] = _upstream_tls(sidecar, peer.spiffe_id)
        clusters.append(cluster)
    return {"node": {"id": f"{sidecar.service}-sidecar", "cluster": sidecar.service},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def routes_from_policy_data(data: dict[str, Any], service: str) -> tuple[SidecarRoute, ...]:
    """The sidecar's routes from the policy data's route table (one source for both)."""
    table = data.get("services", {}).get(service, {}).get("routes", [])
    return tuple(SidecarRoute(str(r["prefix"]), str(r.get("sensitivity", "medium")), bool(r.get("browser", False)))
                 for r in table)
