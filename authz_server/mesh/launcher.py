"""Bring up the demo mesh on this machine: three services behind Envoy sidecars, zero trust.

::

    user ──HTTP──▶ frontend sidecar ─┬─▶ frontend app
                    (public door)    │
    frontend app ──▶ frontend sidecar outbound ──mTLS(SVID)──▶ orders sidecar ──▶ orders app
    orders app   ──▶ orders sidecar outbound   ──mTLS(SVID)──▶ payments sidecar ──▶ payments app
                         every sidecar asks authz-server (ext_authz gRPC over mTLS) per request

Who runs where: the dev SPIFFE issuer, the dev OIDC provider and the three small apps run
inside this process (the demo drives them: rotation, token issuing); authz-server and the
three Envoys are child processes owned by a ``Supervisor``, so leaving the ``async with``
(normally, on an error or on Ctrl-C) stops every one of them. Readiness is checked (ready
file, Envoy's ``/ready``, sockets answering), never slept for.

With ``zero_trust=False`` the same topology runs as the evaluation's baseline: plain HTTP
between sidecars and no ext_authz filter, so requests are only routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import yaml

from ..devidp.config import DevIdPConfig
from ..devidp.provider import DevIdP
from ..workload.config import IdentityConfig
from ..workload.server import IdentityServer
from .envoy import EnvoyProcess, start_envoy
from .extauthz import AuthzTarget
from .processes import Supervisor, free_port
from .sidecar import Outbound, Sidecar, render_sidecar, routes_from_policy_data
from .upstream import serve_echo

TRUST_DOMAIN = "example.org"
SERVICES = ("frontend", "orders", "payments")
CALLS = {"frontend": ("orders", "payments"), "orders": ("payments",), "payments": ()}  # outbound listeners
AUTHZ_ID = f"spiffe://{TRUST_DOMAIN}/authz-server"
OPERATOR_ID = f"spiffe://{TRUST_DOMAIN}/operator"  # the admin API's only client
PARTNER_DOMAIN = "partner.org"  # federated with example.org
UNTRUSTED_DOMAIN = "evil.org"  # its own CA, federated with no one
EXCHANGE_ISSUER = "https://authz.mesh.local/exchange"
AUDIENCE = "mesh"


def spiffe_id(service: str, domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{domain}/{service}"


def default_policies() -> Path:
    """The repository's policies/ (the demo runs from a checkout: `make demo`)."""
    here = Path(__file__).resolve().parents[2] / "policies"
    return here if here.is_dir() else Path("policies")


IDP_USERS = [
    {"username": "alice", "password": "alice-password", "subject": "alice", "claims": {"roles": ["customer"]}},
    {"username": "bob", "password": "bob-password", "subject": "bob", "claims": {"roles": ["support"]}},
]
IDP_CLIENTS = [
    {"client_id": "web", "client_secret": "web-secret", "grants": ["password", "client_credentials"],
     "audiences": [AUDIENCE], "scopes": ["orders:read", "orders:write", "payments:write"]},
]


@dataclass(frozen=True)
class MeshOptions:
    workdir: Path
    zero_trust: bool = True
    policies: Path = field(default_factory=default_policies)
    svid_ttl: str = "1h"
    authz_workers: int = 1
    audit: bool = True
    extra_authz_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Mesh:
    """A running mesh: where everything is, and the in-process parts the demo drives."""

    options: MeshOptions
    supervisor: Supervisor
    identity: IdentityServer
    idp: DevIdP
    sockets: dict[str, Path]  # workload name → its Workload API / SDS socket
    public_url: str  # the frontend's door for users
    outbound_urls: dict[tuple[str, str], str]  # (from, to) → where `from`'s app reaches `to`
    inbound: dict[str, str]  # service → its sidecar's mTLS (or, baseline, plain) listener host:port
    envoys: dict[str, EnvoyProcess]
    authz: dict[str, Any] = field(default_factory=dict)  # authz-server's bound addresses (ready file)
    app_addresses: dict[str, str] = field(default_factory=dict)

    @property
    def policies_dir(self) -> Path:
        return self.options.workdir / "policies"

    @property
    def audit_path(self) -> Path:
        return self.options.workdir / "audit.jsonl"

    def url(self, caller: str, service: str) -> str:
        return self.outbound_urls[(caller, service)]


def identity_config(options: MeshOptions) -> dict[str, Any]:
    run = options.workdir / "run"
    workloads = [{"name": s, "spiffe_id": spiffe_id(s), "socket": str(run / f"{s}.sock")} for s in SERVICES]
    workloads += [
        {"name": "authz-server", "spiffe_id": AUTHZ_ID, "socket": str(run / "authz-server.sock"),
         "dns_names": ["authz-server"]},  # the host name gRPC clients (the tour's operator) verify
        {"name": "operator", "spiffe_id": OPERATOR_ID, "socket": str(run / "operator.sock")},
        {"name": "partner", "spiffe_id": spiffe_id("auditor", PARTNER_DOMAIN), "socket": str(run / "partner.sock")},
        {"name": "intruder", "spiffe_id": spiffe_id("frontend", UNTRUSTED_DOMAIN),
         "socket": str(run / "intruder.sock")},
    ]
    return {
        "state_dir": str(options.workdir / "identity"),
        "svid_ttl": options.svid_ttl,
        "trust_domains": [{"name": TRUST_DOMAIN, "federates_with": [PARTNER_DOMAIN]},
                          {"name": PARTNER_DOMAIN, "federates_with": [TRUST_DOMAIN]},
                          {"name": UNTRUSTED_DOMAIN}],
        "workloads": workloads,
    }


def authz_config(options: MeshOptions, sockets: dict[str, Path], idp_issuer: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "addr": "127.0.0.1:0",
        "policies": str(options.workdir / "policies"),
        "metrics_addr": "127.0.0.1:0",
        "workers": options.authz_workers,
        "deny_body": "explain",  # the tour shows why each refusal happened
        "trust_domains": [TRUST_DOMAIN, PARTNER_DOMAIN],
        "issuers": [{"issuer": idp_issuer, "audiences": [AUDIENCE], "algorithms": ["RS256", "ES256"]}],
        "sessions": {"store": "memory", "idle_timeout": "15m", "max_lifetime": "8h",
                     "delegation": {"actors": [spiffe_id("frontend")]}},
        "tls": {"spiffe_socket": f"unix://{sockets['authz-server']}",
                "allowed_clients": [spiffe_id(s) for s in SERVICES]},
        "admin": {"addr": "127.0.0.1:0", "allowed": [OPERATOR_ID]},
        "exchange": {"addr": "127.0.0.1:0", "issuer": EXCHANGE_ISSUER, "ttl": "5m",
                     "rules": [{"actor": spiffe_id("orders"), "audiences": ["payments"],
                                "scopes": ["payments:write"]}]},
    }
    if options.audit:
        config["audit"] = [f"file:{options.workdir / 'audit.jsonl'}"]
    config.update(options.extra_authz_config)
    return config


def sidecar_for(service: str, *, options: MeshOptions, policy_data: dict[str, Any], sds_socket: Path,
                app: str, inbound: dict[str, str], authz_addr: str, public: str = "") -> Sidecar:
    outbound = tuple(Outbound(peer, "127.0.0.1:0", inbound[peer], spiffe_id(peer)) for peer in CALLS[service])
    return Sidecar(
        service=service, spiffe_id=spiffe_id(service), sds_socket=str(sds_socket), app=app,
        authz=AuthzTarget(authz_addr) if options.zero_trust else None,
        routes=routes_from_policy_data(policy_data, service), inbound=inbound[service], public=public,
        outbound=outbound, authz_spiffe_id=AUTHZ_ID if options.zero_trust else "", mtls=options.zero_trust,
        max_connection_duration="2s",  # the tour's rotation shows the new SVID within seconds
    )


def _copy_policies(options: MeshOptions) -> dict[str, Any]:
    target = options.workdir / "policies"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(options.policies, target)
    data_file = target / "data.yaml"
    return yaml.safe_load(data_file.read_text()) if data_file.exists() else {}


def _start_authz(supervisor: Supervisor, options: MeshOptions, config: dict[str, Any]) -> dict[str, Any]:
    config_path = options.workdir / "authz-server.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    ready = options.workdir / "authz-ready.json"
    ready.unlink(missing_ok=True)
    supervisor.start("authz-server", [sys.executable, "-m", "authz_server.cli", "serve", "--config", str(config_path),
                                      "--ready-file", str(ready)], ready=ready.exists, timeout=60)
    return json.loads(ready.read_text())


@contextlib.asynccontextmanager
async def running_mesh(options: MeshOptions, *, progress: Any = None) -> AsyncIterator[Mesh]:
    """Start the mesh; everything started is stopped when the block is left, however it is left."""
    say = progress or (lambda _text: None)
    workdir = options.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    policy_data = _copy_policies(options)
    stack = contextlib.AsyncExitStack()
    supervisor = Supervisor(workdir / "logs")
    async with stack:
        identity_settings = identity_config(options)
        identity = IdentityServer(IdentityConfig.from_mapping(identity_settings))
        await stack.enter_async_context(identity)
        sockets = {w["name"]: Path(w["socket"]) for w in identity_settings["workloads"]}
        say(f"dev SPIFFE issuer: {len(sockets)} workload sockets in {workdir / 'run'}")

        idp = DevIdP(DevIdPConfig.from_mapping({"users": IDP_USERS, "clients": IDP_CLIENTS}))
        issuer = await idp.start("127.0.0.1:0")
        stack.push_async_callback(idp.stop)
        say(f"dev OIDC provider: {issuer}")

        apps: dict[str, str] = {}
        for service in SERVICES:
            server, bound = await serve_echo("127.0.0.1:0", service)
            stack.push_async_callback(_close_server, server)
            apps[service] = bound

        # Registered last, so it runs first: the children (authz-server, the Envoys) hold streams and
        # keep-alive connections to every part above, which then stop with no one connected to them.
        stack.callback(supervisor.close)
        authz: dict[str, Any] = {}
        authz_addr = ""
        if options.zero_trust:
            authz = await asyncio.to_thread(_start_authz, supervisor, options,
                                            authz_config(options, sockets, issuer))
            authz_addr = authz["addr"]
            say(f"authz-server: ext_authz gRPC (mTLS) on {authz_addr}, admin on {authz.get('admin_addr')}")

        inbound = {service: f"127.0.0.1:{free_port()}" for service in SERVICES}
        sidecars = {
            service: sidecar_for(service, options=options, policy_data=policy_data, sds_socket=sockets[service],
                                 app=apps[service], inbound=inbound, authz_addr=authz_addr,
                                 public="127.0.0.1:0" if service == "frontend" else "")
            for service in SERVICES}
        envoys = dict(zip(SERVICES, await asyncio.gather(*(
            asyncio.to_thread(start_envoy, supervisor, f"{service}-sidecar", render_sidecar(sidecar))
            for service, sidecar in sidecars.items()))))
        public_url = f"http://127.0.0.1:{envoys['frontend'].port('public')}"
        outbound_urls = {(service, peer): f"http://127.0.0.1:{envoys[service].port(f'outbound_{peer}')}"
                         for service in SERVICES for peer in CALLS[service]}
        say(f"sidecars: {', '.join(f'{s} {inbound[s]}' for s in SERVICES)}; public door {public_url}")
        yield Mesh(options, supervisor, identity, idp, sockets, public_url, outbound_urls, inbound, envoys,
                   authz, apps)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


def elapsed_since(started: float) -> str:
    return f"{time.perf_counter() - started:.1f}s"
