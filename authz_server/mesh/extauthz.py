"""Envoy config fragments for asking authz-server: the ext_authz filter and its cluster.

One place builds them so every rendered config (front proxy, sidecars, the compose and
Kubernetes files) asks the same way: ``failure_mode_allow: false`` (authz-server down
means deny), the peer certificate included, bodies forwarded when asked, and paths
normalised before the check so the policy sees the path Envoy routes on.

The cluster is a fleet (one address that resolves to several replicas, or several
addresses), kept honest three ways: active health checks (the gRPC health service's
``envoy.service.auth.v3.Authorization`` status: a draining replica answers NOT_SERVING
and stops getting checks within a second), outlier detection (a replica whose
connections fail is ejected), and retries on another replica of a check that failed
before reaching authz-server (gRPC ``UNAVAILABLE``, reset, refused stream, connect
failure; never a decision). In HTTP mode the health check is TCP: the gRPC health
service needs an HTTP/2 cluster.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

EXT_AUTHZ = "envoy.filters.http.ext_authz"
HEALTH_SERVICE = "envoy.service.auth.v3.Authorization"  # what server.py reports SERVING / NOT_SERVING
VOLATILE_REQUEST_HEADERS = ("x-request-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid",
                            "x-b3-parentspanid", "x-b3-sampled", "b3", "x-envoy-expected-rq-timeout-ms")
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


@dataclass(frozen=True)
class AuthzTarget:
    """Where authz-server listens and how Envoy should talk to it."""

    address: str  # host:port or unix:/path (a name may resolve to every replica)
    mode: str = "grpc"  # "grpc" (richer attributes) or "http" (faster)
    replicas: tuple[str, ...] = ()  # further replicas' addresses, balanced with ``address``
    timeout: str = "0.5s"
    with_request_body: bool = False
    max_request_bytes: int = 8192
    cluster: str = "authz"
    connections: int = 1  # >1 opens several HTTP/2 connections so SO_REUSEPORT workers share the load
    allowed_upstream_headers: tuple[str, ...] = ("x-authz-subject", "x-authz-spiffe-id", "x-authz-decision-id",
                                                 "x-session-id")
    # HTTP mode only. On success Envoy forwards just the named headers; the policy's own
    # header names must be added here (see docs/http-mode.md). Denials carry every header.
    allowed_client_headers_on_success: tuple[str, ...] = ("x-session-id", "set-cookie")
    http_headers_to_add: tuple[tuple[str, str], ...] = field(default=())


def socket_address(address: str) -> dict[str, Any]:
    if address.startswith("unix:"):
        return {"pipe": {"path": address[len("unix:"):]}}
    host, _, port = address.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def cluster_type(address: str) -> str:
    """STATIC for IPs and sockets, STRICT_DNS for names (compose services, Kubernetes services)."""
    if address.startswith("unix:"):
        return "STATIC"
    host = address.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
        return "STATIC"
    except ValueError:
        return "STRICT_DNS"


def static_cluster(name: str, address: str, *, http2: bool = False, more: tuple[str, ...] = ()) -> dict[str, Any]:
    """A cluster of one fixed endpoint, or of ``address`` and ``more`` (HTTP/2 when asked: gRPC
    services such as SDS)."""
    cluster: dict[str, Any] = {
        "name": name, "type": cluster_type(address), "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(each)}} for each in (address, *more)]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = http_protocol_options({"http2_protocol_options": {}})
    return cluster


def http_protocol_options(explicit: dict[str, Any], **common: Any) -> dict[str, Any]:
    """A cluster's ``typed_extension_protocol_options``: the HTTP version (``explicit_http_config``)
    and, optionally, ``common_http_protocol_options``."""
    options: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"}
    if common:
        options["common_http_protocol_options"] = common
    options["explicit_http_config"] = explicit
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}


def ext_authz_filter(target: AuthzTarget) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": False,
        "include_peer_certificate": True,
        "include_tls_session": True,
        "status_on_error": {"code": "Forbidden"},
    }
    if target.with_request_body:
        config["with_request_body"] = {"max_request_bytes": target.max_request_bytes, "allow_partial_message": True}
    if target.mode == "grpc":
        # GrpcService.retry_policy (not EnvoyGrpc's, which only xDS streams use): the calls' default.
        config["grpc_service"] = {"envoy_grpc": {"cluster_name": target.cluster}, "timeout": target.timeout,
                                  "retry_policy": retry_policy("unavailable,reset,connect-failure,refused-stream",
                                                               target.timeout)}
    elif target.mode == "http":
        config["http_service"] = {
            "server_uri": {"uri": "http://authz", "cluster": target.cluster, "timeout": target.timeout},
            "path_prefix": "/check",
            # A 5xx from authz-server's HTTP front is a decision (a dependency down), not retried.
            "retry_policy": retry_policy("reset,connect-failure,refused-stream", target.timeout),
            "authorization_request": {
                "headers_to_add": [{"key": k, "value": v} for k, v in target.http_headers_to_add],
            },
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"exact": h} for h in target.allowed_upstream_headers]},
                "allowed_client_headers_on_success": {
                    "patterns": [{"exact": h} for h in target.allowed_client_headers_on_success]},
            },
        }
        if not target.http_headers_to_add:
            del config["http_service"]["authorization_request"]
        # Every header reaches the check (the policy decides, not the proxy's allow-list) except
        # the per-request ids: without them a repeated request arrives byte-for-byte identical
        # and authz-server answers it from its exact-request cache.
        config["allowed_headers"] = {"patterns": [{"safe_regex": {"regex": ".*"}}]}
        config["disallowed_headers"] = {"patterns": [{"exact": h} for h in VOLATILE_REQUEST_HEADERS]}
    else:
        raise ValueError(f"unknown ext_authz mode {target.mode!r}: use grpc or http")
    return {"name": EXT_AUTHZ, "typed_config": config}


def retry_policy(retry_on: str, timeout: str) -> dict[str, Any]:
    """Two more tries, each on a replica not tried yet, within the check's one timeout.

    Envoy turns this core RetryPolicy into a route one with ``retry_back_off.max_interval`` as
    the *per-try timeout* (envoyproxy/envoy#38847): a short one would abandon and retry every
    check slower than it, multiplying the load exactly when the fleet is busy. So it is the
    check's own timeout; the back-off itself stays near ``base_interval`` (5 ms, 10 ms)."""
    return {
        "retry_on": retry_on,
        "num_retries": 2,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": timeout},
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3,
    }


def fleet_health(mode: str) -> dict[str, Any]:
    """``health_checks`` and ``outlier_detection`` for a cluster of authz-server replicas."""
    check: dict[str, Any] = {"timeout": "1s", "interval": "1s", "interval_jitter": "0.1s",
                             "no_traffic_interval": "1s",  # checks count Envoy's own traffic as none
                             "unhealthy_threshold": 2, "healthy_threshold": 1, "reuse_connection": True}
    if mode == "grpc":
        check["grpc_health_check"] = {"service_name": HEALTH_SERVICE}  # NOT_SERVING: out at once
    else:
        check["tcp_health_check"] = {}
    return {
        "health_checks": [check],
        "outlier_detection": {
            "consecutive_5xx": 5, "consecutive_gateway_failure": 5, "consecutive_local_origin_failure": 5,
            "split_external_local_origin_errors": True, "interval": "1s", "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
        # Retries may use up to a quarter of the checks in flight (at least 8 at once): enough for
        # a replica going away, not enough to multiply an overload.
        "circuit_breakers": {"thresholds": [{"retry_budget": {"budget_percent": {"value": 25.0},
                                                              "min_retry_concurrency": 8}}]},
    }


def authz_cluster(target: AuthzTarget) -> dict[str, Any]:
    cluster = static_cluster(target.cluster, target.address, more=target.replicas)
    cluster.update(fleet_health(target.mode))
    if target.mode == "grpc":
        http2: dict[str, Any] = {}
        if target.connections > 1:
            # One stream per connection at most max_concurrent_streams: Envoy opens more connections
            # once the limit is reached, and the kernel spreads those across the workers.
            http2["max_concurrent_streams"] = 16
        cluster["typed_extension_protocol_options"] = http_protocol_options({"http2_protocol_options": http2})
    else:
        # Envoy closes idle connections to the HTTP front before the front would (its
        # limits.idle_timeout defaults to 60 s): a close from the front could cross a request.
        cluster["typed_extension_protocol_options"] = http_protocol_options({"http_protocol_options": {}},
                                                                            idle_timeout="50s")
    return cluster


def per_route_context(extensions: dict[str, str]) -> dict[str, Any]:
    """``typed_per_filter_config`` for a route: ext_authz ``context_extensions`` (e.g. sensitivity)."""
    return {EXT_AUTHZ: {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
        "check_settings": {"context_extensions": dict(extensions)},
    }}


def hcm_path_safety() -> dict[str, Any]:
    """HTTP connection manager settings so ext_authz sees the path the router routes on."""
    return {
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
    }
