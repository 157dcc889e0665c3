"""Issue 4's first target: what a TLS handshake between two sidecars costs, measured side by side.

Two real Envoys, A → B, in mutual TLS with SPIFFE-style certificates from files (B requires
A's certificate and accepts only A's URI SAN; A accepts only B's). wrk drives A's plain-HTTP
listener with keep-alive; A proxies every request to B, which answers 200 itself
(``direct_response``, so the upstream costs next to nothing). Per TLS version (1.3, 1.2):

* **reused**: A keeps its upstream connections to B (HTTP/1.1 keep-alive pool): the steady state;
* **new + resumed**: a new TLS connection per request (A's ``max_requests_per_connection: 1``)
  with session resumption (A caches session keys, B issues stateless tickets: Envoy's defaults);
* **new, full handshake**: the same without resumption (A ``max_session_keys: 0``; B stateless
  and stateful resumption disabled).

TLS 1.3 has one more row, resumption with A keeping 64 session keys instead of Envoy's default 1:
TLS 1.3 session tickets are single-use, Envoy drops a key once used, so with one key and many
connections opening at once most find no key and do a full handshake (the counters show it).
Plain HTTP A → B (reused, and a new TCP connection per request) is the no-TLS reference.
Handshakes are read from Envoy's own counters (B's listener ``ssl.handshake`` and
``ssl.session_reused``, A's cluster ``upstream_cx_total`` and ``ssl.*``) around the measured
wrk run, and checked: a resumption row must show resumed handshakes on both sides, a full-handshake
row none, a per-request row one connection per request, a reused row (almost) none.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz_server.mesh.envoy import EnvoyProcess, start_envoy
from authz_server.mesh.extauthz import socket_address
from authz_server.mesh.front import FrontProxy, Route, render_front_proxy
from tests.support.pki import ScratchCA

from .harness import LoadResult, Settings, bench_supervisor, cpu_seconds, run_wrk, table

TRUST_DOMAIN = "example.org"
A_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/a"
B_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/b"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    tls: str | None  # "TLSv1_3", "TLSv1_2" or None (plain HTTP)
    new_per_request: bool
    resume: bool = True
    session_keys: int | None = None  # A's max_session_keys; None: Envoy's default (1)


ROWS = (
    Row("plain_reused", "plain HTTP, connection reused", None, False),
    Row("plain_new", "plain HTTP, new TCP connection per request", None, True),
    Row("tls13_reused", "mTLS 1.3, connection reused", "TLSv1_3", False),
    Row("tls13_resumed", "mTLS 1.3, new connection per request, resumed", "TLSv1_3", True, True),
    Row("tls13_resumed_keys64", "mTLS 1.3, new connection per request, resumed, A keeps 64 session keys", "TLSv1_3",
        True, True, 64),
    Row("tls13_full", "mTLS 1.3, new connection per request, full handshake", "TLSv1_3", True, False),
    Row("tls12_reused", "mTLS 1.2, connection reused", "TLSv1_2", False),
    Row("tls12_resumed", "mTLS 1.2, new connection per request, resumed", "TLSv1_2", True, True),
    Row("tls12_full", "mTLS 1.2, new connection per request, full handshake", "TLSv1_2", True, False),
)


@dataclass(frozen=True)
class Pki:
    a_cert: Path
    a_key: Path
    b_cert: Path
    b_key: Path
    ca: Path

    @classmethod
    def create(cls, folder: Path) -> "Pki":
        ca = ScratchCA.create(TRUST_DOMAIN)
        a_cert, a_key, bundle = ca.write(folder, "a", ca.issue(A_ID))
        b_cert, b_key, _ = ca.write(folder, "b", ca.issue(B_ID))
        return cls(a_cert, a_key, b_cert, b_key, bundle)


def _common_tls(version: str, cert: Path, key: Path, ca: Path, peer_id: str) -> dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": version, "tls_maximum_protocol_version": version},
        "tls_certificates": [{"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}],
        "validation_context": {"trusted_ca": {"filename": str(ca)},
                               "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer_id}}]},
    }


def _downstream_tls(row: Row, pki: Pki) -> dict[str, Any]:
    assert row.tls is not None
    config: dict[str, Any] = {"@type": f"{TLS}.DownstreamTlsContext", "require_client_certificate": True,
                              "common_tls_context": _common_tls(row.tls, pki.b_cert, pki.b_key, pki.ca, A_ID)}
    if not row.resume:
        config["disable_stateless_session_resumption"] = True
        config["disable_stateful_session_resumption"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


def _upstream_tls(row: Row, pki: Pki) -> dict[str, Any]:
    assert row.tls is not None
    config: dict[str, Any] = {"@type": f"{TLS}.UpstreamTlsContext",
                              "common_tls_context": _common_tls(row.tls, pki.a_cert, pki.a_key, pki.ca, B_ID)}
    if not row.resume:
        config["max_session_keys"] = 0  # default 1: A keeps the last session to resume with
    elif row.session_keys is not None:
        config["max_session_keys"] = row.session_keys
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


def render_b(pki: Pki) -> dict[str, Any]:
    """B: one listener per row (so each row's TLS settings and counters stand alone), all 200."""
    listeners = []
    for row in ROWS:
        listener = render_front_proxy(FrontProxy(routes=(Route("/", direct_response="ok"),), listener_name=row.key,
                                                 stats_prefix=f"b_{row.key}"))["static_resources"]["listeners"][0]
        # Listener counters are named after the configured address (127.0.0.1_0 for all of them)
        # unless the listener has its own prefix: listener.b_<row>.ssl.handshake and so on.
        listener["stat_prefix"] = f"b_{row.key}"
        if row.tls:
            listener["filter_chains"][0]["transport_socket"] = _downstream_tls(row, pki)
        listeners.append(listener)
    return {"static_resources": {"listeners": listeners, "clusters": []}}


def render_a(pki: Pki, b_ports: dict[str, int]) -> dict[str, Any]:
    """A: a plain-HTTP listener; ``/<row>`` goes to a cluster with that row's connection settings."""
    config = render_front_proxy(FrontProxy(routes=(Route("/", direct_response="no such row"),)))
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    clusters = []
    for row in ROWS:
        routes.insert(0, {"match": {"prefix": f"/{row.key}"}, "route": {"cluster": row.key, "timeout": "10s"}})
        http: dict[str, Any] = {"@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                                "explicit_http_config": {"http_protocol_options": {}}}
        if row.new_per_request:
            http["common_http_protocol_options"] = {"max_requests_per_connection": 1}
        cluster: dict[str, Any] = {
            "name": row.key, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": row.key, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": socket_address(f"127.0.0.1:{b_ports[row.key]}")}}]}]},
            "typed_extension_protocol_options": {HTTP_OPTIONS: http},
        }
        if row.tls:
            cluster["transport_socket"] = _upstream_tls(row, pki)
        clusters.append(cluster)
    config["static_resources"]["clusters"] = clusters
    return config


def _counters(a: EnvoyProcess, b: EnvoyProcess, row: Row) -> dict[str, int]:
    b_listener = f"b_{row.key}"
    a_stats, b_stats = a.stats(f"cluster.{row.key}."), b.stats(f"listener.{b_listener}.")
    return {
        "a_cx": a_stats.get(f"cluster.{row.key}.upstream_cx_total", 0),
        "a_handshakes": a_stats.get(f"cluster.{row.key}.ssl.handshake", 0),
        "a_resumed": a_stats.get(f"cluster.{row.key}.ssl.session_reused", 0),
        "b_cx": b_stats.get(f"listener.{b_listener}.downstream_cx_total", 0),
        "b_handshakes": b_stats.get(f"listener.{b_listener}.ssl.handshake", 0),
        "b_resumed": b_stats.get(f"listener.{b_listener}.ssl.session_reused", 0),
        "b_tls_errors": b_stats.get(f"listener.{b_listener}.ssl.connection_error", 0),
    }


def _measure_row(row: Row, url: str, settings: Settings, a: EnvoyProcess, b: EnvoyProcess) -> LoadResult:
    """Warm up, then wrk with Envoy counters and both Envoys' CPU read around the measured run."""
    run_wrk(url, settings, duration=settings.warmup)
    pids = (a.child.popen.pid, b.child.popen.pid)
    best: LoadResult | None = None
    for _ in range(settings.repeats):
        before, cpu_before = _counters(a, b, row), [cpu_seconds(p) for p in pids]
        result = run_wrk(url, settings)
        after, cpu_after = _counters(a, b, row), [cpu_seconds(p) for p in pids]
        delta = {k: after[k] - before[k] for k in after}
        seconds = result.seconds or settings.duration
        result.extra = {**delta, "new_cx_per_s": delta["a_cx"] / seconds,
                        "handshakes_per_s": delta["b_handshakes"] / seconds,
                        "resumed_share": delta["b_resumed"] / delta["b_handshakes"] if delta["b_handshakes"] else None,
                        "a_cpu_us_per_req": (cpu_after[0] - cpu_before[0]) / max(result.requests, 1) * 1e6,
                        "b_cpu_us_per_req": (cpu_after[1] - cpu_before[1]) / max(result.requests, 1) * 1e6}
        if best is None or result.rps > best.rps:
            best = result
    assert best is not None
    best.name = row.label
    return best


def check(row: Row, result: LoadResult) -> list[str]:
    """What the counters must show for the row to mean what its label says."""
    x, problems = result.extra, []
    requests = max(result.requests, 1)
    if row.new_per_request and x["a_cx"] < 0.9 * requests:
        problems.append(f"{row.key}: {x['a_cx']} new upstream connections for {requests} requests")
    if not row.new_per_request and x["a_cx"] > 0.01 * requests:
        problems.append(f"{row.key}: {x['a_cx']} new upstream connections although reused")
    if row.tls and row.new_per_request:
        if x["b_handshakes"] < 0.9 * x["a_cx"]:
            problems.append(f"{row.key}: B completed {x['b_handshakes']} handshakes for {x['a_cx']} connections")
        if row.resume and not (x["b_resumed"] > 0 and x["a_resumed"] > 0):
            problems.append(f"{row.key}: no resumed handshake (B {x['b_resumed']}, A {x['a_resumed']})")
        if abs(x["a_resumed"] - x["b_resumed"]) > 0.05 * max(x["a_resumed"], x["b_resumed"]) + 5:
            problems.append(f"{row.key}: A counted {x['a_resumed']} resumed handshakes, B {x['b_resumed']}")
        if not row.resume and (x["b_resumed"] or x["a_resumed"]):
            problems.append(f"{row.key}: {x['b_resumed']} resumed handshakes although resumption is off")
    if x["b_tls_errors"]:
        problems.append(f"{row.key}: {x['b_tls_errors']} TLS connection errors on B")
    return problems


def measure(settings: Settings) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="authz-bench-handshake-"))
    pki = Pki.create(folder / "pki")
    results: dict[str, Any] = {}
    with bench_supervisor("handshake") as sup:
        b = start_envoy(sup, "b", render_b(pki))
        b_addrs = b.listener_addresses()
        b_ports = {row.key: int(b_addrs[row.key].rsplit(":", 1)[1]) for row in ROWS}
        a = start_envoy(sup, "a", render_a(pki, b_ports))
        a_port = a.port("ingress")
        for row in ROWS:
            results[row.key] = _measure_row(row, f"http://127.0.0.1:{a_port}/{row.key}", settings, a, b)
    problems = [p for row in ROWS for p in check(row, results[row.key])]
    results["problems"] = problems
    return results


def _cpu(result: LoadResult) -> float:
    return result.extra["a_cpu_us_per_req"] + result.extra["b_cpu_us_per_req"]


def report(results: dict[str, Any]) -> str:
    rows = []
    for row in ROWS:
        result: LoadResult = results[row.key]
        x = result.extra
        reference = results[f"{row.key.split('_')[0]}_reused"]
        share = x["resumed_share"]
        resumed = "-" if not row.tls or not row.new_per_request else f"{share:.0%}" if share is not None else "n/a"
        # CPU a new connection adds (A+B), over the same TLS version's reused row.
        per_cx = ((_cpu(result) - _cpu(reference)) * result.requests / x["a_cx"]
                  if row.new_per_request and x["a_cx"] else None)
        rows.append([result.name, f"{result.rps:,.0f}", f"{result.rps / (reference.rps or 1):.2f}",
                     f"{x['new_cx_per_s']:,.0f}", f"{x['handshakes_per_s']:,.0f}" if row.tls else "-", resumed,
                     f"{_cpu(result):.0f}", f"{per_cx:.0f}" if per_cx is not None else "-", f"{result.p99_ms:.2f}",
                     result.non_2xx + result.errors])
    text = table("TLS handshakes between sidecars: Envoy A → Envoy B, in one run", [
        "A → B", "req/s", "× reused (same TLS)", "new conns/s (A)", "handshakes/s (B)", "resumed (B)",
        "A+B CPU µs/req", "+ A+B CPU µs per new conn", "p99 ms", "failures"], rows)
    if results.get("problems"):
        text += "\n\nCOUNTERS DISAGREE WITH THE SET-UP:\n  " + "\n  ".join(results["problems"])
    return text


def run(settings: Settings) -> tuple[dict[str, Any], str]:
    results = measure(settings)
    text = report(results)
    if results["problems"]:
        raise AssertionError(text)
    return results, text
