"""The in-process target: authz-server's own ``App`` (shipped policies, identity service, signals,
audit log to a file) asked directly, with each request built as the CheckRequest a sidecar
would send — no network, and time that the caller sets.

What a sidecar adds is reproduced from the same sources the mesh renders its sidecars from: the
route's ``service`` and ``sensitivity`` (``mesh/sidecar.py`` rendering of ``policies/data.yaml``,
longest prefix first, a catch-all at the service's strongest sensitivity), the caller's SPIFFE
ID as ``source.principal`` and its certificate as ``source.certificate``. Envoy's path
normalisation and TLS handshake are not here: the path reaches the policy as given, and a
workload's certificate is taken as verified (``enforces_tls`` is False).
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from envoy.service.auth.v3 import external_auth_pb2

from ..config import config_from_mapping
from ..devidp.provider import DevIdP
from ..envoy import check_response, facts_from_check_request
from ..identity.exchange import TokenExchange
from ..identity.sessions import session_key
from ..mesh.sidecar import SENSITIVITY_ORDER, routes_from_policy_data
from ..server import App, build_app
from .model import EXCHANGE_AUDIENCE, Outcome, Request, error_code
from .targets import AuditFile
from .world import Clock, Limits, Pki, TokenForge, authz_settings, idp_config

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
IDP_ISSUER = "http://127.0.0.1:9/evaluate-idp"  # named, never served: keys reach authz-server as a file


class SidecarContext:
    """The ``context_extensions`` a sidecar rendered from the policy data puts on a request."""

    def __init__(self, policy_data: Mapping[str, Any]) -> None:
        self._routes: dict[str, list[tuple[str, str]]] = {}
        for service in (policy_data.get("services") or {}):
            routes = routes_from_policy_data(dict(policy_data), service)
            levels = [SENSITIVITY_ORDER.index(r.sensitivity) for r in routes if r.sensitivity in SENSITIVITY_ORDER]
            strongest = SENSITIVITY_ORDER[max(levels, default=1)]
            table = [(r.prefix, r.sensitivity) for r in routes]
            if not any(prefix == "/" for prefix, _ in table):
                table.append(("/", strongest))
            self._routes[service] = sorted(table, key=lambda item: -len(item[0]))

    def __call__(self, service: str, path: str) -> dict[str, str]:
        plain = path.split("?", 1)[0]
        for prefix, sensitivity in self._routes.get(service, [("/", "medium")]):
            if plain.startswith(prefix):
                return {"service": service, "sensitivity": sensitivity}
        return {"service": service, "sensitivity": "medium"}


def copy_policies(source: Path, folder: Path) -> tuple[Path, dict[str, Any]]:
    """A private copy of the policy folder (the evaluation never touches the original) and its data."""
    target = folder / "policies"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    data_file = target / "data.yaml"
    data = yaml.safe_load(data_file.read_text()) if data_file.exists() else {}
    return target, data or {}


@dataclass
class InProcessWorld:
    """authz-server's ``App`` for the evaluated world, started without its network fronts."""

    folder: Path
    clock: Clock
    pki: Pki
    idp: DevIdP
    forge: TokenForge
    app: App
    exchanger: TokenExchange
    context: SidecarContext
    audit: AuditFile | None

    @classmethod
    async def create(cls, policies: Path, folder: Path, *, limits: Limits | None = Limits(),
                     audit: bool = True) -> "InProcessWorld":
        folder.mkdir(parents=True, exist_ok=True)
        clock = Clock(time.time())
        pki = Pki(clock.now)
        idp = DevIdP(idp_config(IDP_ISSUER), clock=clock)
        jwks = folder / "idp.jwks.json"
        jwks.write_text(json.dumps(idp.jwks()))
        copied, data = copy_policies(policies, folder)
        settings = authz_settings(policies=copied, folder=folder, issuer=IDP_ISSUER, jwks_file=jwks, limits=limits,
                                  audit=audit)
        settings["addr"] = ""  # no gRPC port: requests are handed to the pipeline
        config = config_from_mapping(settings, base_dir=str(folder))
        app = build_app(config)  # with an exchange section: its signer, and its issuer trusted
        await app.start()
        assert app.identity is not None and app.signer is not None and config.exchange is not None
        # The same exchange as the server's endpoint, on this world's clock.
        exchanger = TokenExchange(config.exchange, signer=app.signer, tokens=app.identity.tokens,
                                  store=app.identity.store,
                                  delegation_actors=app.identity.settings.delegation_actors, clock=clock)
        return cls(folder, clock, pki, idp, TokenForge(idp, clock), app, exchanger, SidecarContext(data),
                   AuditFile(folder / "audit.jsonl") if audit else None)

    async def close(self) -> None:
        await self.app.stop(0)

    def at(self, offset: float | None) -> float:
        """Move the world's clock to ``start + offset``; without an offset, a millisecond on."""
        if offset is None:
            self.clock.now += 0.001
        else:
            self.clock.now = self.start + offset
        return self.clock.now

    @property
    def start(self) -> float:
        return self.pki.now

    def check_request(self, request: Request, request_id: str) -> external_auth_pb2.CheckRequest:
        check = external_auth_pb2.CheckRequest()
        attributes = check.attributes
        attributes.source.address.socket_address.address = request.source
        attributes.source.address.socket_address.port_value = 40000 + int(request_id) % 20000
        if request.workload:
            attributes.source.principal = request.workload
            attributes.source.certificate = self.pki.escaped_certificate(request.workload)
        attributes.destination.address.socket_address.address = "10.0.0.1"
        attributes.destination.address.socket_address.port_value = 8000
        http = attributes.request.http
        http.id, http.method, http.path, http.host = request_id, request.method, request.path, request.service
        http.scheme, http.protocol = "http", "HTTP/1.1"
        headers = {":authority": request.service, ":method": request.method, ":path": request.path,
                   ":scheme": "http", "user-agent": request.user_agent, "x-request-id": f"eval-{request_id}",
                   "x-forwarded-proto": "http"}
        headers.update({k.lower(): v for k, v in request.headers})
        for name, value in headers.items():
            http.headers[name] = value
        for name, value in self.context(request.service, request.path).items():
            attributes.context_extensions[name] = value
        return check


class InProcessTarget:
    """``Target`` over an ``InProcessWorld``; with ``zero_trust=False`` nothing is checked."""

    through_envoy = False
    enforces_tls = False

    def __init__(self, world: InProcessWorld, *, zero_trust: bool = True) -> None:
        self.world = world
        self.zero_trust = zero_trust
        self.name = "in-process decision pipeline" if zero_trust else "in-process baseline (nothing checked)"
        self._ids = itertools.count(1)

    async def send(self, request: Request) -> Outcome:
        now = self.world.at(request.at)
        if not self.zero_trust:
            return Outcome(200, reached=True, upstream_path=request.path, note="routed, nothing checked")
        check = self.world.check_request(request, str(next(self._ids)))
        decision = await self.world.app.pipeline.decide(facts_from_check_request(check), now=now)
        answer = check_response(decision)
        if decision.allowed:
            upstream = {o.header.key: o.header.value for o in answer.ok_response.headers}
            to_client = {o.header.key: o.header.value for o in answer.ok_response.response_headers_to_add}
            return Outcome(200, reached=True, decision_id=upstream.get("x-authz-decision-id", ""),
                           session_id=to_client.get("x-session-id", ""), upstream_path=request.path,
                           headers=to_client)
        denied = answer.denied_response
        headers = {o.header.key: o.header.value for o in denied.headers}
        return Outcome(int(denied.status.code), code=error_code(denied.body),
                       decision_id=headers.get("x-authz-decision-id", ""), headers=headers)

    def user_token(self, user: str) -> str:
        return self.world.forge.valid(user)

    def forged_token(self, defect: str, user: str) -> str:
        return self.world.forge.craft(defect, user)

    async def exchange(self, actor: str, subject_token: str, audience: str = EXCHANGE_AUDIENCE) -> str:
        if not self.zero_trust:
            return subject_token  # nothing checks tokens in the baseline
        form = {"grant_type": GRANT_TYPE, "subject_token": subject_token, "subject_token_type": ACCESS_TOKEN,
                "audience": audience}
        answer = await self.world.exchanger.exchange(form, (actor, self.world.pki.thumbprint(actor)))
        return str(answer["access_token"])

    async def revoke(self, session_id: str) -> None:
        store = self.world.app.identity.store if self.world.app.identity else None
        if store is not None:
            await store.revoke(session_key(session_id), now=self.world.clock.now)

    async def audit_records(self, decision_ids: Iterable[str]) -> dict[str, Mapping[str, Any]]:
        audit = self.world.audit
        log = self.world.app.audit
        if audit is None or log is None:
            return {}
        return await audit.records(decision_ids, flush=log.drain)

    async def tls_refusals(self) -> int:
        return 0
