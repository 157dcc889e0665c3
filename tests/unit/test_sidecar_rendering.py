"""The sidecar template: what a route's sensitivity and the mesh topology turn into in Envoy."""

from __future__ import annotations

from typing import Any

import pytest

from authz_server.mesh.extauthz import AuthzTarget
from authz_server.mesh.sidecar import ALL_BUNDLES, TLS_VERSION_HEADER, Outbound, Sidecar, SidecarRoute, \
    render_sidecar, routes_from_policy_data

DATA = {"services": {"payments": {"routes": [{"prefix": "/payments", "sensitivity": "high"}]},
                     "frontend": {"routes": [{"prefix": "/account", "sensitivity": "medium", "browser": True},
                                             {"prefix": "/", "sensitivity": "low"}]}}}


def sidecar(service: str, **overrides: Any) -> Sidecar:
    settings: dict[str, Any] = dict(
        service=service, spiffe_id=f"spiffe://example.org/{service}", sds_socket="/run/agent.sock",
        app="127.0.0.1:8080", authz=AuthzTarget("127.0.0.1:9191"), routes=routes_from_policy_data(DATA, service),
        inbound="127.0.0.1:8443", authz_spiffe_id="spiffe://example.org/authz-server")
    settings.update(overrides)
    return Sidecar(**settings)


def listener(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in config["static_resources"]["listeners"] if item["name"] == name)


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in config["static_resources"]["clusters"] if item["name"] == name)


def hcm(listener_config: dict[str, Any]) -> dict[str, Any]:
    return listener_config["filter_chains"][0]["filters"][0]["typed_config"]


def test_a_high_route_makes_the_inbound_listener_tls13_only_and_client_certificates_required() -> None:
    tls = listener(render_sidecar(sidecar("payments")), "inbound")["filter_chains"][0]["transport_socket"]
    context = tls["typed_config"]
    assert context["require_client_certificate"] is True
    assert context["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    low = listener(render_sidecar(sidecar("frontend")), "inbound")["filter_chains"][0]["transport_socket"]
    assert low["typed_config"]["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"


def test_certificates_and_bundles_come_from_sds_by_spire_names() -> None:
    common = listener(render_sidecar(sidecar("payments")), "inbound")["filter_chains"][0]["transport_socket"][
        "typed_config"]["common_tls_context"]
    assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["spiffe://example.org/payments"]
    assert common["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == ALL_BUNDLES
    sds = cluster(render_sidecar(sidecar("payments")), "spiffe_workload_api")
    endpoint = sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint == {"pipe": {"path": "/run/agent.sock"}}


def test_every_route_is_checked_with_its_service_and_sensitivity_and_unlisted_paths_too() -> None:
    routes = hcm(listener(render_sidecar(sidecar("payments")), "inbound"))["route_config"]["virtual_hosts"][0]["routes"]
    contexts = {r["match"]["prefix"]: r["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"][
        "context_extensions"] for r in routes}
    assert contexts == {"/payments": {"service": "payments", "sensitivity": "high"},
                        "/": {"service": "payments", "sensitivity": "high"}}
    assert [r["match"]["prefix"] for r in routes] == ["/payments", "/"]  # longest prefix first


def test_browser_routes_say_so_to_the_check() -> None:
    routes = hcm(listener(render_sidecar(sidecar("frontend")), "inbound"))["route_config"]["virtual_hosts"][0]["routes"]
    account = next(r for r in routes if r["match"]["prefix"] == "/account")
    assert account["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"][
        "context_extensions"]["browser"] == "true"


def test_the_check_learns_the_tls_version_envoy_negotiated_and_clients_cannot_forge_it() -> None:
    filters = hcm(listener(render_sidecar(sidecar("orders", routes=(SidecarRoute("/orders"),))), "inbound"))[
        "http_filters"]
    names = [f["name"] for f in filters]
    assert names.index("envoy.filters.http.header_mutation") < names.index("envoy.filters.http.ext_authz")
    mutation = filters[0]["typed_config"]["mutations"]["request_mutations"][0]["append"]
    assert mutation["header"] == {"key": TLS_VERSION_HEADER, "value": "%DOWNSTREAM_TLS_VERSION%"}
    assert mutation["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"


def test_outbound_pins_the_peer_identity_and_authz_is_asked_over_mtls() -> None:
    config = render_sidecar(sidecar("frontend", outbound=(
        Outbound("orders", "127.0.0.1:9001", "127.0.0.1:18443", "spiffe://example.org/orders"),)))
    peer = cluster(config, "peer_orders")["transport_socket"]["typed_config"]["common_tls_context"]
    assert peer["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://example.org/orders"}}]
    assert peer["tls_certificate_sds_secret_configs"][0]["name"] == "spiffe://example.org/frontend"
    authz = cluster(config, "authz")["transport_socket"]["typed_config"]["common_tls_context"]
    assert authz["alpn_protocols"] == ["h2"]
    assert authz["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"][0][
        "matcher"]["exact"] == "spiffe://example.org/authz-server"
    assert hcm(listener(config, "outbound_orders"))["http_filters"][-1]["name"] == "envoy.filters.http.router"
    # enough TLS 1.3 session keys that connections opened together all resume (see the handshake bench)
    assert cluster(config, "peer_orders")["transport_socket"]["typed_config"]["max_session_keys"] == 64


@pytest.mark.parametrize("service", ["frontend", "payments"])
def test_the_baseline_has_no_check_and_no_tls(service: str) -> None:
    config = render_sidecar(sidecar(service, authz=None, mtls=False, authz_spiffe_id=""))
    inbound = listener(config, "inbound")
    assert "transport_socket" not in inbound["filter_chains"][0]
    assert [f["name"] for f in hcm(inbound)["http_filters"]] == ["envoy.filters.http.router"]
    assert {c["name"] for c in config["static_resources"]["clusters"]} == {"app"}
