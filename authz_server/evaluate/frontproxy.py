"""The Envoy target: a real Envoy front proxy (rendered with ``mesh/front.py``, paths made safe
with ``mesh/extauthz.hcm_path_safety``) in front of the services, asking a real
``authz-server serve`` child process over gRPC ext_authz.

One Envoy, one listener per door, every door routing to an echo service that reports the path
it received:

* ``frontend_public`` — plain HTTP, the users' door (browsers have no certificate);
* ``<service>_mtls`` for frontend, orders and payments — TLS that requires a client certificate
  chained to the CA of ``example.org`` or of its federated ``partner.org``, nothing else: a
  workload's SPIFFE ID is what its certificate proves, and Envoy hands it to the check as
  ``source.principal`` (and the certificate itself);
* ``orders_lenient`` — like ``orders_mtls`` but misconfigured to trust every CA, evil.org's
  included: what authz-server does when a workload of an untrusted domain gets past TLS.

Each door's routes carry ``service`` and ``sensitivity`` from the policy data, as the mesh's
sidecars do. The baseline (``zero_trust=False``) has the same doors and routes with no TLS and
no ext_authz: requests are only routed.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import httpx
import yaml

from ..devidp.provider import DevIdP
from ..mesh.envoy import EnvoyProcess, start_envoy
from ..mesh.extauthz import AuthzTarget
from ..mesh.front import FrontProxy, Route, render_front_proxy
from ..mesh.processes import Supervisor
from ..mesh.upstream import serve_echo
from .client import RawResponse, TlsRefused, client_context, send_raw
from .inprocess import SidecarContext, copy_policies
from .load import start_authz_server
from .model import (EXCHANGE_AUDIENCE, PARTNER_DOMAIN, SERVICES, TRUST_DOMAIN, UNTRUSTED_DOMAIN, Outcome, Request,
                    error_code, spiffe_id)
from .targets import AuditFile
from .world import Limits, Pki, TokenForge, authz_settings, idp_config

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
REDIRECTS = {301, 302, 303, 307, 308}


def door_routes(context: SidecarContext, service: str, policy_data: Mapping[str, Any]) -> tuple[Route, ...]:
    """The routes a sidecar renders for ``service`` (longest prefix first, a catch-all at the end)."""
    prefixes = [str(r["prefix"]) for r in (policy_data.get("services") or {}).get(service, {}).get("routes", [])]
    if "/" not in prefixes:
        prefixes.append("/")
    return tuple(Route(prefix, context_extensions=context(service, prefix))
                 for prefix in sorted(prefixes, key=lambda p: -len(p)))


def _downstream_tls(chain: Path, key: Path, trusted_ca: Path) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": f"{TLS}.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": str(chain)},
                                  "private_key": {"filename": str(key)}}],
            "validation_context": {"trusted_ca": {"filename": str(trusted_ca)}},
        },
    }}


@dataclass(frozen=True)
class Door:
    name: str
    service: str
    tls_ca: Path | None = None  # None: plain HTTP


def render_doors(doors: Iterable[Door], *, upstream: str, authz: AuthzTarget | None, context: SidecarContext,
                 policy_data: Mapping[str, Any], server_chain: Path, server_key: Path) -> dict[str, Any]:
    """One Envoy config holding a front-proxy listener per door (clusters shared)."""
    listeners: list[dict[str, Any]] = []
    clusters: dict[str, dict[str, Any]] = {}
    for door in doors:
        rendered = render_front_proxy(FrontProxy(upstream=upstream, authz=authz,
                                                 routes=door_routes(context, door.service, policy_data),
                                                 listener_name=door.name, stats_prefix=door.name))
        resources = rendered["static_resources"]
        listener = resources["listeners"][0]
        if door.tls_ca is not None:
            listener["filter_chains"][0]["transport_socket"] = _downstream_tls(server_chain, server_key, door.tls_ca)
        listeners.append(listener)
        for cluster in resources["clusters"]:
            clusters[cluster["name"]] = cluster
    return {"static_resources": {"listeners": listeners, "clusters": list(clusters.values())}}


@dataclass
class EnvoyWorld:
    """Everything the Envoy targets share: identities, the dev provider (served over HTTP, found
    by authz-server through OIDC discovery), the echo service, the policy copy."""

    folder: Path
    pki: Pki
    idp: DevIdP
    forge: TokenForge
    upstream: str
    policies: Path
    policy_data: dict[str, Any]
    context: SidecarContext
    _closers: list[Any] = field(default_factory=list)

    @classmethod
    async def create(cls, policies: Path, folder: Path) -> "EnvoyWorld":
        import time

        folder.mkdir(parents=True, exist_ok=True)
        pki = Pki(time.time())
        idp = DevIdP(idp_config())
        await idp.start("127.0.0.1:0")
        server, upstream = await serve_echo("127.0.0.1:0", "service")
        copied, data = copy_policies(policies, folder)
        world = cls(folder, pki, idp, TokenForge(idp, time.time), upstream, copied, data, SidecarContext(data))
        world._closers += [idp.stop, server]
        return world

    async def close(self) -> None:
        for closer in reversed(self._closers):
            if isinstance(closer, asyncio.AbstractServer):
                closer.close()
            else:
                await closer()


class EnvoyTarget:
    """``Target``: requests go through a real Envoy; with zero trust, Envoy asks ``authz-server serve``."""

    through_envoy = True

    def __init__(self, world: EnvoyWorld, supervisor: Supervisor, *, zero_trust: bool,
                 limits: Limits | None = Limits()) -> None:
        self.world = world
        self.supervisor = supervisor
        self.zero_trust = zero_trust
        self.enforces_tls = zero_trust
        self.limits = limits
        self.name = ("Envoy front proxy + authz-server (gRPC ext_authz, mTLS doors)" if zero_trust
                     else "Envoy front proxy alone (baseline: routed, nothing checked)")
        self.ports: dict[str, int] = {}
        self.authz: dict[str, Any] = {}
        self.envoy: EnvoyProcess | None = None
        self.audit: AuditFile | None = None
        self.folder = world.folder / ("zero-trust" if zero_trust else "baseline")

    async def start(self) -> "EnvoyTarget":
        world, folder = self.world, self.folder
        folder.mkdir(parents=True, exist_ok=True)
        authz = None
        if self.zero_trust:
            settings = authz_settings(policies=world.policies, folder=folder, issuer=world.idp.issuer,
                                      limits=self.limits, audit=True)
            config_file = folder / "authz-server.yaml"
            config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
            _pid, self.authz = await asyncio.to_thread(start_authz_server, self.supervisor, "authz-server",
                                                       ["--config", str(config_file)])
            authz = AuthzTarget(self.authz["addr"])
            self.audit = AuditFile(folder / "audit.jsonl")
        pki = world.pki
        tls_dir = folder / "tls"
        server_chain, server_key = pki.write(tls_dir, spiffe_id("front-proxy"))
        federated = tls_dir / "federated-ca.pem"
        federated.write_bytes(pki.ca_pem(TRUST_DOMAIN, PARTNER_DOMAIN))
        everyone = tls_dir / "every-ca.pem"
        everyone.write_bytes(pki.ca_pem(TRUST_DOMAIN, PARTNER_DOMAIN, UNTRUSTED_DOMAIN))
        tls = self.zero_trust
        doors = [Door("frontend_public", "frontend")]
        doors += [Door(f"{s}_mtls", s, federated if tls else None) for s in SERVICES]
        doors.append(Door("orders_lenient", "orders", everyone if tls else None))
        config = render_doors(doors, upstream=world.upstream, authz=authz, context=world.context,
                              policy_data=world.policy_data, server_chain=server_chain, server_key=server_key)
        name = "envoy-zero-trust" if self.zero_trust else "envoy-baseline"
        self.envoy = await asyncio.to_thread(start_envoy, self.supervisor, name, config)
        self.ports = {door.name: self.envoy.port(door.name) for door in doors}
        self._ca = pki.ca_pem(TRUST_DOMAIN)
        self._contexts: dict[str | None, Any] = {}
        return self

    # -- sending
    def _door(self, request: Request) -> tuple[str, bool]:
        if request.door == "lenient":
            return "orders_lenient", self.zero_trust
        if request.workload is None and request.service == "frontend":
            return "frontend_public", False
        return f"{request.service}_mtls", self.zero_trust

    def _tls(self, workload: str | None) -> Any:
        context = self._contexts.get(workload)
        if context is None:
            chain = key = None
            if workload is not None:
                chain, key = self.world.pki.write(self.folder / "clients", workload)
            context = self._contexts[workload] = client_context(self._ca, str(chain) if chain else None,
                                                                str(key) if key else None)
        return context

    async def send(self, request: Request) -> Outcome:
        door, tls = self._door(request)
        port = self.ports[door]
        headers = [("user-agent", request.user_agent), *request.headers]
        target = request.path
        redirects = 0
        while True:
            try:
                answer = await send_raw("127.0.0.1", port, target, method=request.method, headers=headers,
                                        tls=self._tls(request.workload) if tls else None,
                                        local_address=loopback(request.source))
            except TlsRefused as exc:
                return Outcome(0, tls_refused=True, note=f"TLS handshake refused: {exc}")
            if answer.status in REDIRECTS and "location" in answer.headers and redirects < 3:
                redirects += 1
                target = urllib.parse.urlsplit(answer.headers["location"]).path or "/"
                continue
            return _outcome(answer, redirects)

    # -- credentials
    def user_token(self, user: str) -> str:
        return self.world.forge.valid(user)

    def forged_token(self, defect: str, user: str) -> str:
        return self.world.forge.craft(defect, user)

    async def exchange(self, actor: str, subject_token: str, audience: str = EXCHANGE_AUDIENCE) -> str:
        """As ``actor``'s sidecar would: the actor's certificate in ``x-forwarded-client-cert``
        (authz-server's exchange endpoint is configured to trust it, behind a sidecar). The
        baseline has no exchange: the token is passed on as it is, nothing checks it anyway."""
        if not self.zero_trust:
            return subject_token
        certificate = self.world.pki.escaped_certificate(actor)
        xfcc = f'Cert="{certificate}";URI={actor}'
        form = {"grant_type": GRANT_TYPE, "subject_token": subject_token, "subject_token_type": ACCESS_TOKEN,
                "audience": audience}
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(f"http://{self.authz['exchange_addr']}/token", data=form,
                                       headers={"x-forwarded-client-cert": xfcc})
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    # -- evidence
    async def audit_records(self, decision_ids: Iterable[str]) -> dict[str, Mapping[str, Any]]:
        if self.audit is None:
            return {}
        return await self.audit.records(decision_ids)

    async def tls_refusals(self) -> int:
        if self.envoy is None:
            return 0
        stats = await asyncio.to_thread(self.envoy.stats, "ssl.fail_verify")
        return sum(v for k, v in stats.items() if k.endswith(("ssl.fail_verify_error", "ssl.fail_verify_no_cert")))


def loopback(source: str) -> str:
    """Each simulated client address gets its own loopback address (127.0.0.0/8 is all local), so
    Envoy and authz-server see distinct clients: ``10.0.1.12`` → ``127.0.1.12``."""
    parts = source.split(".")
    return "127." + ".".join(parts[1:]) if len(parts) == 4 else "127.0.0.1"


def _outcome(answer: RawResponse, redirects: int) -> Outcome:
    reached = False
    upstream_path = ""
    decision_id = answer.headers.get("x-authz-decision-id", "")
    if 200 <= answer.status < 300:
        try:
            echoed = json.loads(answer.body)
        except ValueError:
            echoed = None
        if isinstance(echoed, dict) and "path" in echoed:
            reached = True
            upstream_path = str(echoed["path"])
            decision_id = decision_id or str(echoed.get("headers", {}).get("x-authz-decision-id", ""))
    return Outcome(answer.status, reached=reached, code=error_code(answer.body), decision_id=decision_id,
                   session_id=answer.headers.get("x-session-id", ""), upstream_path=upstream_path,
                   redirects=redirects, headers=answer.headers)
