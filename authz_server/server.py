"""The gRPC shell: ext_authz v3 ``Authorization/Check``, ``grpc.health.v1``, reflection.

``build_app`` wires everything from one ``Config`` (no globals); ``App.start`` binds the
ports and starts the background tasks; ``App.stop`` undoes it. The servicer takes the raw
request bytes and parses them itself, so a CheckRequest that does not even decode (bad
UTF-8 in a string field, truncated bytes) is answered with a 400 deny, never a gRPC error
that Envoy would have to interpret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from .audit import AuditLog, open_sink
from .audit.log import default_labels
from .bundles.plane import ControlPlaneClient
from .shadow.evaluator import ShadowEvaluator
from .config import Config
from .decision import Decision, Pipeline
from .envoy import (check_response_bytes, cut_volatile, facts_from_check_request, input_from_request_json,
                    parse_check_request, repeat_facts)
from .errors import AuthzError, RequestError, WorkloadError, where_it_failed
from .exchangefront import ExchangeEndpoint
from .http import serve_http
from .identity.redis_store import RedisStore
from .identity.resolver import IdentityService, accept_actor
from .identity.sessions import MemoryStore
from .identity.spiffe import BundleSet, PeerCertificateCache, accept_trust_domains
from .identity.workloads import PrincipalVerifier
from .limits import Limits
from .httpfront import HttpFront
from .metrics import Metrics, identity_collector, pipeline_collector, signals_collector
from .signals import Signals
from .policy.loader import PolicyRuntime
from .explaining import ExplainMode
from .repeats import RepeatCache
from .tasks import cancel_all
from .tracing import tracing_from_env
from .identity.exchange import ExchangeSigner, TokenExchange
from .tls import ServerSslContext, SpiffeIdCheck, TlsSource, server_credentials, tls_source_from

log = logging.getLogger("authz_server.server")

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
# SERVING while what is on disk is what serves; NOT_SERVING after a rejected reload
# (the last good policy still answers): lets an operator alert on it without failing probes.
POLICY_HEALTH_SERVICE = "authz_server.PolicyReload"


# grpc.aio takes calls from gRPC core one at a time; the ones that arrive faster wait in core's
# pending queue. Past 1,000 waiting (core's default soft limit) core cancels new calls at random,
# more of them as the queue nears 3,000: 2,000 Checks at once came back ~200 CANCELLED before any
# decision. The queue is drained in microseconds per call, so waiting is the better answer to a
# burst; beyond the hard limit core still sheds calls (Envoy then applies failure_mode_allow,
# deny by default), which bounds the memory held by calls not yet started.
PENDING_CALL_LIMITS = (("grpc.server.max_pending_requests", 20_000),
                       ("grpc.server.max_pending_requests_hard_limit", 40_000))


class AuthorizationServicer:
    def __init__(self, pipeline: Pipeline, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, clients: SpiffeIdCheck | None = None,
                 repeat_entries: int = 20_000, limits: Limits | None = None) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._clock = clock
        self._clients = clients  # mTLS: which sidecars may ask
        self._limits = limits or Limits()
        self.repeats = RepeatCache(repeat_entries)  # repeat key (cut_volatile) → a cached allow to replay

    async def check(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        now = self._clock()
        if self._clients is not None and self._clients.caller(context) is None:
            decision = self._pipeline.refuse(WorkloadError(
                f"{context.peer()} is not an allowed ext_authz client", code="ext_authz_client_not_allowed"), now=now)
            return check_response_bytes(decision)
        facts = cut = repeated = None
        try:
            cut = cut_volatile(raw) if len(raw) <= self.repeats.max_request_bytes else None
            if cut is not None:
                key, volatile = cut
                repeated = self.repeats.replay(key, self._pipeline, now, lambda first: repeat_facts(first, volatile))
            if repeated is None:
                facts = facts_from_check_request(parse_check_request(raw, self._limits),
                                                 None if cut is None else cut[0])
        except RequestError as exc:
            decision = self._pipeline.refuse(exc, now=now)
        except Exception as exc:  # never let a surprise reach Envoy as a gRPC error
            log.error("could not read a CheckRequest: %s", where_it_failed(exc))
            decision = self._pipeline.refuse(AuthzError(f"internal error: {type(exc).__name__}",
                                                        code="internal_error"), now=now)
        else:
            if facts is None:
                decision = repeated
            else:
                decision = await self._pipeline.decide(facts, now=now)
                if cut is not None:
                    self.repeats.put(cut[0], decision, facts, len(raw))
        response = check_response_bytes(decision)
        if self._metrics is not None:
            self._metrics.observe_latency(time.perf_counter() - started, "grpc")
        return response

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {"Check": grpc.unary_unary_rpc_method_handler(
            self.check, request_deserializer=None, response_serializer=None)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, handlers)])
        # Registered methods skip grpcio's per-call method lookup (what generated stubs do too).
        server.add_registered_method_handlers(AUTHORIZATION_SERVICE, handlers)


class _GenericHandlersOnly:
    """Adds a service to ``server`` through its generic handlers only, never as registered methods.

    grpc.aio keeps one pending call request per registered method and, for every incoming call,
    waits on all of them at once (``asyncio.wait``, pure Python, linear in their number). Health and
    reflection as registered methods (four) took about 12 % of the serving thread under load
    (py-spy); found by the generic lookup instead, they cost only the rare calls that use them."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass  # on purpose: see the class docstring


def _log_failure(decision: Decision, facts: Any, now: float) -> None:
    """A deny the policy did not give (bad request, error, timeout): always a warning. A sign-in
    redirect (a 3xx from browser_login) is the flow working, not a failure: info."""
    if not decision.allowed and decision.verdict is None:
        if 300 <= decision.http_status < 400:
            log.info("redirect %s: %s", decision.decision_id, decision.code)
            return
        log.warning("deny %s: %s: %s", decision.decision_id, decision.code, decision.reason)


def _log_every_decision(decision: Decision, facts: Any, now: float) -> None:
    """With --log-level debug: every decision the policy gave too. Chosen once at start, so
    the usual levels do not pay a level check on every request."""
    if decision.allowed or decision.verdict is not None:
        log.debug("decision %s: %s (%s)", decision.decision_id, decision.code, decision.reason)
    else:
        _log_failure(decision, facts, now)


@dataclass
class App:
    config: Config
    runtime: PolicyRuntime
    pipeline: Pipeline
    metrics: Metrics
    health: health.aio.HealthServicer
    reuse_port: bool = False
    identity: IdentityService | None = None
    audit: AuditLog | None = None
    server: grpc.aio.Server | None = None
    admin_server: grpc.aio.Server | None = None
    tls: TlsSource | None = None
    signer: ExchangeSigner | None = None
    exchange: TokenExchange | None = None
    control: ControlPlaneClient | None = None  # OPA bundles, status, decision logs
    shadow: ShadowEvaluator | None = None
    tracing: Any = None  # a tracing.spans.DecisionTracer when OTEL_* configures tracing
    explaining: ExplainMode | None = None  # the admin API's explain mode, attached to the pipeline
    bound: dict[str, str] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    draining: bool = False
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _http_servers: list[asyncio.Server] = field(default_factory=list)

    async def start(self) -> dict[str, str]:
        """Load policies, bind every configured port; returns name → bound address.

        The first policy set from a folder must load, compile and pass its tests: a server
        that could only deny is a mistake to report at once (``PolicyError``), not a process to
        keep running. Later reloads keep the last good set instead. Sets from bundles arrive
        when the control plane has them: until then the server denies and reports NOT_SERVING."""
        self._loop = asyncio.get_running_loop()
        serves_folder = self.control is None or self.control.bundles is None or not self.control.bundles.live_names
        if self.runtime.active is None and serves_folder:
            await asyncio.to_thread(self.runtime.load)
        await self._follow_bundles()
        if self.config.addr:
            self.server = grpc.aio.server(options=[
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
                # Larger than any request the limits let through, so that one over them gets a
                # clean deny (request_too_large) instead of a gRPC error, up to 4 MiB.
                ("grpc.max_receive_message_length", max(4 * 1024 * 1024, self.config.limits.max_request_bytes) + 1024),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                *PENDING_CALL_LIMITS,
            ])
            clients = None
            if self.config.tls is not None and self.config.tls.allowed_clients:
                clients = SpiffeIdCheck(accept_actor(self.config.tls.allowed_clients))
            AuthorizationServicer(self.pipeline, self.metrics, clients=clients,
                                  limits=self.config.limits).register(self.server)
            rarely_called = _GenericHandlersOnly(self.server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, rarely_called)
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
                [AUTHORIZATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]), rarely_called)
            if self.config.tls is not None and self.tls is None:
                self.tls = await asyncio.to_thread(tls_source_from, self.config.tls)
            if self.tls is not None:
                port = self.server.add_secure_port(self.config.addr, server_credentials(self.tls))
            else:
                port = self.server.add_insecure_port(self.config.addr)
            if port == 0 and not self.config.addr.startswith("unix:"):
                raise OSError(f"cannot bind gRPC address {self.config.addr}")
            await self.server.start()
            host = self.config.addr.rpartition(":")[0]
            self.bound["addr"] = self.config.addr if self.config.addr.startswith("unix:") else f"{host}:{port}"
        if self.config.admin.addr:
            await self._start_admin()
        if self.config.exchange is not None:
            await self._start_exchange()
        if self.config.http_addr:
            front = HttpFront(self.pipeline, path_prefix=self.config.http_path_prefix,
                              on_latency=self.metrics.observe_latency)
            server, address = await serve_http(front.handle, self.config.http_addr, reuse_port=self.reuse_port,
                                               limits=self.config.limits, replay=front.replay)
            self._http_servers.append(server)
            self.bound["http_addr"] = address
        if self.config.metrics_addr:
            server, address = await serve_http(self.metrics.http_handler, self.config.metrics_addr)
            self._http_servers.append(server)
            self.bound["metrics_addr"] = address
        if serves_folder:
            self._tasks.append(asyncio.create_task(self.runtime.watch(), name="policy-watch"))
        if self.control is not None:
            await self.control.start()
        if self.shadow is not None:
            await self.shadow.start(folder=not self.shadow.runtime.root.startswith("bundle:"))
        if self.pipeline.signals is not None:
            self._tasks.append(asyncio.create_task(self.pipeline.signals.watch(), name="threat-lists"))
        if self.audit is not None:
            self.audit.start()
        await self._start_identity()
        await self._update_health()
        return self.bound

    async def _follow_bundles(self) -> None:
        """With the Workload API configured, forwarded peer certificates must chain to its bundles
        (own and federated trust domains), followed as they rotate; before the first ones
        arrive, certificates are refused (fail closed)."""
        bundles = getattr(self.identity.workloads, "bundles", None) if self.identity is not None else None
        if bundles is None or self.config.tls is None or not self.config.tls.spiffe_socket:
            return
        if self.tls is None:
            self.tls = await asyncio.to_thread(tls_source_from, self.config.tls)
        # WorkloadApiTls keeps its py-spiffe X509Source private; one stream serves both uses.
        source = getattr(self.tls, "x509_source", None) or getattr(self.tls, "_source", None)
        if source is None:
            log.error("no Workload API source to take trust bundles from: peer certificates will be refused")
            return
        await asyncio.to_thread(bundles.follow, source)
        log.info("peer certificates verified against the bundles of %s", ", ".join(bundles.trust_domains) or "none")

    async def _start_admin(self) -> None:
        from .admin import AdminService
        from ._proto import authz_admin_pb2_grpc

        if self.tls is None:
            assert self.config.tls is not None
            self.tls = await asyncio.to_thread(tls_source_from, self.config.tls)
        assert self.tls is not None and self.identity is not None
        self.admin_server = grpc.aio.server()
        admin = AdminService(self.identity, self.config.admin.allowed, runtime=self.runtime, shadow=self.shadow,
                             explaining=self.explaining)
        authz_admin_pb2_grpc.add_AdminServicer_to_server(admin, self.admin_server)
        port = self.admin_server.add_secure_port(self.config.admin.addr, server_credentials(self.tls))
        await self.admin_server.start()
        host = self.config.admin.addr.rpartition(":")[0]
        self.bound["admin_addr"] = (self.config.admin.addr if self.config.admin.addr.startswith("unix:")
                                    else f"{host}:{port}")

    async def _start_exchange(self) -> None:
        exchange_config = self.config.exchange
        assert exchange_config is not None and self.signer is not None and self.identity is not None
        self.exchange = TokenExchange(exchange_config, signer=self.signer, tokens=self.identity.tokens,
                                      store=self.identity.store,
                                      delegation_actors=self.identity.settings.delegation_actors)
        context = None
        if self.config.tls is not None:
            if self.tls is None:
                self.tls = await asyncio.to_thread(tls_source_from, self.config.tls)
            assert self.tls is not None
            ssl_context = ServerSslContext(self.tls)
            context = ssl_context.context
            self._tasks.append(asyncio.create_task(_follow_rotation(ssl_context), name="exchange-tls"))
        server, address = await serve_http(ExchangeEndpoint(self.exchange).handle, exchange_config.addr, ssl=context)
        self._http_servers.append(server)
        self.bound["exchange_addr"] = address

    async def _start_identity(self) -> None:
        if self.identity is None:
            return
        for part in (self.identity.store, self.identity.tokens):
            start = getattr(part, "start", None)
            if start is not None:
                await start()

    async def _update_health(self) -> None:
        serving = self.runtime.active is not None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(AUTHORIZATION_SERVICE, status)
        current = serving and self.runtime.status.current
        await self.health.set(POLICY_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING if current
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    def on_policy_change(self, _runtime: PolicyRuntime) -> None:
        # Called wherever the runtime swapped the set, a worker thread included (reloads
        # activate off the loop): health is updated on the server's own loop either way.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._update_health(), loop)

    async def drain(self) -> None:
        """Report NOT_SERVING for every service (health checks and readiness probes take this
        replica out of rotation) while still answering every check."""
        if not self.draining:
            self.draining = True
            await self.health.enter_graceful_shutdown()
            log.info("draining: every health status is NOT_SERVING")

    async def stop(self, grace: float = 1.0) -> None:
        await self.drain()
        await cancel_all(self._tasks)
        if self.shadow is not None:
            await self.shadow.stop()
        if self.control is not None:
            await self.control.stop()
        if self.server is not None:
            await self.server.stop(grace)
        if self.admin_server is not None:
            await self.admin_server.stop(grace)
        if self.tls is not None:
            self.tls.close()
            self.tls = None
        for server in self._http_servers:
            server.close()
        self._http_servers.clear()
        if self.pipeline.signals is not None:
            await self.pipeline.signals.close()
        if self.identity is not None:
            for part in (self.identity.store, self.identity.tokens, self.identity.browser):
                close = getattr(part, "close", None)
                if close is not None:
                    await close()
        if self.audit is not None:
            await self.audit.stop()  # after the fronts: every decision made is flushed (within a bound)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # likewise for their spans
        self.runtime.close()


async def _follow_rotation(context: "ServerSslContext") -> None:
    while True:
        await asyncio.sleep(1.0)
        context.refresh()


def build_identity(config: Config, signer: ExchangeSigner | None = None) -> IdentityService:
    settings = config.sessions.settings
    store: Any = None
    if settings.enabled:
        store = (MemoryStore() if config.sessions.store == "memory"
                 else RedisStore(config.sessions.store, near_cache_ttl=config.sessions.near_cache_ttl))
    issuers = list(config.issuers)
    if config.exchange is not None and signer is not None:
        issuers.append(_exchange_issuer(config, signer))
    tokens = None
    if issuers:
        from .identity.jose import parse_jwks
        from .identity.oidc import IssuerRegistry

        held = {config.exchange.issuer: parse_jwks(signer.jwks)} if config.exchange and signer else None
        tokens = IssuerRegistry(issuers, held_keys=held)
    # Envoy forwards the peer certificate: parsed once per certificate, and checked against the
    # Workload API's bundles when authz-server has one (App.start follows them).
    bundles = BundleSet() if config.tls is not None and config.tls.spiffe_socket else None
    workloads = PrincipalVerifier(accept_trust_domains(config.trust_domains),
                                  certificates=PeerCertificateCache(bundles=bundles))
    browser = _browser_login(config, tokens, store) if config.browser_login is not None else None
    return IdentityService(settings, store=store, tokens=tokens, workloads=workloads, browser=browser)


def _browser_login(config: Config, tokens: Any, store: Any) -> Any:
    from .identity.browser import BrowserLogin

    login = config.browser_login
    assert login is not None and tokens is not None and store is not None

    async def first_use(state: str, until: float, now: float) -> bool:
        return await store.claim_jti("browser-login", state, "callback", until=until, now=now) is None

    return BrowserLogin(login, metadata=lambda: tokens.metadata(login.issuer), keys=tokens.keys(login.issuer).current,
                        policy=tokens.policy(login.issuer), claim_once=first_use)


def _exchange_issuer(config: Config, signer: ExchangeSigner) -> Any:
    """authz-server trusts the tokens its own exchange endpoint issues: ES256, at+jwt, always
    bound to the actor's certificate."""
    from .identity.oidc import IssuerConfig

    assert config.exchange is not None
    audiences = tuple(sorted({a for rule in config.exchange.rules for a in rule.audiences}))
    return IssuerConfig(issuer=config.exchange.issuer, audiences=audiences, algorithms=("ES256",), typ="at+jwt",
                        require_sender_constraint=True, key="exchange")


def build_app(config: Config, *, reuse_port: bool = False) -> App:
    """Wire one server from one config; nothing global is touched."""
    plane = config.control_plane
    bundles = plane.live_bundles if plane is not None else ()
    runtime = PolicyRuntime("bundle:" + ",".join(b.name for b in bundles) if bundles else config.policies,
                            query=config.query, isolation=config.policy_isolation, strict=config.strict_builtin_errors,
                            read_request=input_from_request_json,
                            **({"pool_size": config.policy_threads} if config.policy_threads else {}))
    shadow_runtime = _shadow_runtime(config)
    labels = default_labels()
    control = ControlPlaneClient(plane, runtime, labels=labels, shadow_runtime=shadow_runtime) if plane else None
    metrics = Metrics()
    signer = ExchangeSigner.load_or_create(config.exchange.key_file) if config.exchange is not None else None
    identity = build_identity(config, signer)
    decision_logs = control.decision_log_sink() if control is not None else None
    sinks = [open_sink(spec) for spec in config.audit] + ([decision_logs] if decision_logs is not None else [])
    audit = AuditLog(sinks, query=config.query, labels=labels) if sinks else None
    shadow = None
    if shadow_runtime is not None and plane is not None and plane.shadow is not None:
        shadow = ShadowEvaluator(shadow_runtime, sample=plane.shadow.sample, deny_status=config.decision.deny_status,
                                 audit=audit)
    signals = Signals(config.signals) if config.signals is not None else None
    tracing = tracing_from_env()  # None unless OTEL_* names an exporter or endpoint: then nothing runs
    pipeline = Pipeline(runtime, settings=config.decision, identity=identity, signals=signals,
                        observers=[metrics.observe_decision,
                                   _log_every_decision if log.isEnabledFor(logging.DEBUG) else _log_failure,
                                   *([audit.observe] if audit else []), *([shadow.observe] if shadow else []),
                                   *([tracing.observe] if tracing else [])],
                        tracing=tracing)
    explaining = ExplainMode()  # switched on by the admin API; until then the pipeline holds None
    explaining.attach(pipeline)
    for part in (control, decision_logs, shadow, tracing):
        if part is not None:
            metrics.watch(part.collect)
    metrics.watch(pipeline_collector(pipeline, runtime))
    metrics.watch(identity_collector(identity))
    if signals is not None:
        metrics.watch(signals_collector(signals))
    if audit is not None:
        metrics.watch(audit.collect)
    app = App(config=config, runtime=runtime, pipeline=pipeline, metrics=metrics,
              health=health.aio.HealthServicer(), reuse_port=reuse_port, identity=identity, signer=signer, audit=audit,
              control=control, shadow=shadow, tracing=tracing, explaining=explaining)
    runtime.listeners.append(app.on_policy_change)
    return app


def _shadow_runtime(config: Config) -> PolicyRuntime | None:
    """The shadow policy's own runtime: a folder it loads and watches, or a bundle the
    control plane offers it. Evaluated on worker threads only (never inline on the loop)."""
    shadow = config.control_plane.shadow if config.control_plane is not None else None
    if shadow is None:
        return None
    root = shadow.policies or f"bundle:{shadow.bundle}"
    return PolicyRuntime(root, query=config.query, isolation="thread", read_request=input_from_request_json)
