"""The admin API (``protos/authz_admin.proto``): sessions, issuers, policy data, shadow rollout
and explain mode, for operators.

It listens on its own address and only over mutual TLS: the caller's SPIFFE ID, read from
its client certificate (the URI SAN), must be one of ``admin.allowed``. Anyone else gets
``PERMISSION_DENIED`` and the attempt is logged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any, Callable

import grpc

from ._proto import authz_admin_pb2 as pb
from ._proto import authz_admin_pb2_grpc as pb_grpc
from .errors import AuthzError, SessionError
from .identity.resolver import IdentityService, accept_actor
from .identity.sessions import Binding, Session, new_session_id, session_key
from .tls import SpiffeIdCheck, peer_spiffe_id

log = logging.getLogger("authz_server.admin")


def _info(session: Session) -> pb.SessionInfo:
    return pb.SessionInfo(
        id_sha256=session.key, subject=session.subject, issuer=session.issuer, created=session.created,
        expires=session.expires, last_seen=session.last_seen, idle_timeout=session.idle_timeout,
        bound_to=pb.Binding(**asdict(session.binding)), claims_json=json.dumps(dict(session.claims)),
        generation=session.generation,
    )


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, identity: IdentityService, allowed: tuple[str, ...], *, runtime: Any = None,
                 shadow: Any = None, explaining: Any = None, clock: Callable[[], float] = time.time) -> None:
        self._identity = identity
        self._runtime = runtime
        self._shadow = shadow
        self._explaining = explaining  # explaining.ExplainMode
        self._check = SpiffeIdCheck(accept_actor(allowed))
        self._clock = clock

    async def _caller(self, context: grpc.aio.ServicerContext, action: str) -> str:
        caller = self._check.caller(context)
        if caller is None:
            presented = peer_spiffe_id(context.auth_context() or {})
            log.warning("admin %s refused for %s from %s", action, presented or "a caller without a SPIFFE ID",
                        context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{presented or 'no SPIFFE ID'} may not use the "
                                                                     "admin API")
        log.info("admin %s by %s", action, caller)
        assert caller is not None
        return caller

    def _store(self) -> Any:
        if self._identity.store is None:
            raise SessionError("sessions are disabled", code="sessions_disabled")
        return self._identity.store

    @staticmethod
    async def _fail(context: grpc.aio.ServicerContext, error: AuthzError) -> None:
        status = {"session_unknown": grpc.StatusCode.NOT_FOUND, "session_revoked": grpc.StatusCode.NOT_FOUND,
                  "session_expired": grpc.StatusCode.NOT_FOUND}.get(error.code, grpc.StatusCode.FAILED_PRECONDITION)
        if error.status == 503:
            status = grpc.StatusCode.UNAVAILABLE
        await context.abort(status, str(error))

    @staticmethod
    def _key(ref: pb.SessionRef) -> str:
        which = ref.WhichOneof("ref")
        if which == "id":
            return session_key(ref.id)
        if which == "id_sha256" and len(ref.id_sha256) == 64:
            return ref.id_sha256
        raise SessionError("give a session id or the 64-hex SHA-256 of one", code="malformed_session_id")

    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
                            ) -> pb.CreateSessionResponse:
        caller = await self._caller(context, "CreateSession")
        try:
            claims = json.loads(request.claims_json or "{}")
            if not isinstance(claims, dict):
                raise ValueError("claims_json must be a JSON object")
            if not request.subject:
                raise ValueError("subject is required")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        settings = self._identity.settings
        now = self._clock()
        ttl = request.ttl_seconds if request.ttl_seconds > 0 else settings.max_lifetime
        new_id = new_session_id()
        bind = request.bind_to
        session = Session(key=session_key(new_id), subject=request.subject,
                          issuer=request.issuer or f"admin:{caller}", claims={**claims, "sub": request.subject},
                          created=now, expires=now + min(ttl, settings.max_lifetime),
                          idle_timeout=min(settings.idle_timeout, ttl),
                          binding=Binding(bind.spiffe_id, bind.cert_sha256, bind.user_agent_sha256),
                          generation=0, last_seen=now)
        try:
            stored = await self._store().create(session, now=now)
        except AuthzError as exc:
            await self._fail(context, exc)
        return pb.CreateSessionResponse(id=new_id, session=_info(stored))

    async def GetSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        await self._caller(context, "GetSession")
        try:
            store = self._store()
            key = self._key(request)
            found = [s for s in await store.sessions(now=self._clock()) if s.key == key]
            if not found:
                raise SessionError("no such live session", code="session_unknown")
        except AuthzError as exc:
            await self._fail(context, exc)
        return _info(found[0])

    async def ListSessions(self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ListSessionsResponse:
        await self._caller(context, "ListSessions")
        try:
            sessions = await self._store().sessions(subject=request.subject or None, now=self._clock())
        except AuthzError as exc:
            await self._fail(context, exc)
        return pb.ListSessionsResponse(sessions=[_info(s) for s in sessions])

    async def RevokeSession(self, request: pb.SessionRef, context: grpc.aio.ServicerContext
                            ) -> pb.RevokeSessionResponse:
        caller = await self._caller(context, "RevokeSession")
        try:
            revoked = await self._store().revoke(self._key(request), now=self._clock())
        except AuthzError as exc:
            await self._fail(context, exc)
        log.info("session %s revoked by %s: %s", self._key(request)[:16], caller, revoked)
        return pb.RevokeSessionResponse(revoked=revoked)

    async def RevokeSubject(self, request: pb.RevokeSubjectRequest, context: grpc.aio.ServicerContext
                            ) -> pb.RevokeSubjectResponse:
        caller = await self._caller(context, "RevokeSubject")
        if not request.subject:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "subject is required")
        try:
            generation = await self._store().revoke_subject(request.subject)
        except AuthzError as exc:
            await self._fail(context, exc)
        log.info("every session of %s revoked by %s", request.subject, caller)
        return pb.RevokeSubjectResponse(generation=generation)

    async def ListIssuers(self, request: pb.ListIssuersRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ListIssuersResponse:
        await self._caller(context, "ListIssuers")
        tokens = self._identity.tokens
        statuses = tokens.status() if tokens is not None and hasattr(tokens, "status") else []
        return pb.ListIssuersResponse(issuers=[_issuer_status(s) for s in statuses])


    async def SetPolicyData(self, request: pb.SetPolicyDataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.PolicyDataResponse:
        caller = await self._caller(context, "SetPolicyData")
        value = None
        if request.value_json:
            try:
                value = json.loads(request.value_json)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"value_json is not JSON: {exc}")
        try:
            version = await self._runtime.set_data(request.path, value)
        except AuthzError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        log.info("policy data %s %s by %s: now policy %s", request.path, "set" if value is not None else "removed",
                 caller, version)
        return pb.PolicyDataResponse(policy_version=version, value_json=request.value_json)

    async def GetPolicyData(self, request: pb.GetPolicyDataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.PolicyDataResponse:
        await self._caller(context, "GetPolicyData")
        active = self._runtime.active
        if active is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no policy is loaded")
        node: Any = active.policy_set.data
        for part in (p for p in request.path.split("/") if p):
            if not isinstance(node, dict) or part not in node:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no data at {request.path!r}")
            node = node[part]
        return pb.PolicyDataResponse(policy_version=active.version, value_json=json.dumps(node))

    async def GetShadow(self, request: pb.GetShadowRequest, context: grpc.aio.ServicerContext) -> pb.ShadowState:
        await self._caller(context, "GetShadow")
        live = self._runtime.active if self._runtime is not None else None
        if self._shadow is None:
            return pb.ShadowState(configured=False, live_version=live.version if live else "")
        active = self._shadow.runtime.active
        return pb.ShadowState(
            configured=True, version=active.version if active else "",
            revision=active.policy_set.revision if active else "", source=self._shadow.runtime.root,
            live_version=live.version if live else "", compared=self._shadow.stats.compared,
            disagreements_json=json.dumps(self._shadow.stats.disagreements))

    async def PromoteShadow(self, request: pb.PromoteShadowRequest, context: grpc.aio.ServicerContext
                            ) -> pb.PromoteShadowResponse:
        from .shadow.promote import promote

        caller = await self._caller(context, "PromoteShadow")
        try:
            active = await promote(self._shadow, self._runtime, expect_version=request.expect_version, by=caller)
        except AuthzError as exc:
            status = grpc.StatusCode.ABORTED if exc.code == "shadow_version_changed" else \
                grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(status, str(exc))
        log.info("shadow policy promoted to live by %s: now policy %s", caller, active.version)
        return pb.PromoteShadowResponse(policy_version=active.version, revision=active.policy_set.revision)


    async def StartExplain(self, request: pb.StartExplainRequest, context: grpc.aio.ServicerContext
                           ) -> pb.ExplainRule:
        caller = await self._caller(context, "StartExplain")
        if self._explaining is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "explain mode is not available on this server")
        try:
            rule = self._explaining.start(subject=request.subject, route=request.route, mode=request.mode or "fails",
                                          count=request.count or 10, ttl=request.ttl_seconds or 300.0,
                                          now=self._clock(), by=caller)
        except AuthzError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if exc.code == "explain_busy"
                                else grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        log.info("explain mode %s by %s: the next %d decisions of %s %s (%s), for %.0fs", rule.id, caller,
                 rule.remaining, "subject" if rule.subject else "route", rule.subject or rule.route, rule.mode,
                 rule.until - self._clock())
        return _explain_rule(rule)

    async def ListExplain(self, request: pb.ListExplainRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ListExplainResponse:
        await self._caller(context, "ListExplain")
        rules = self._explaining.live(self._clock()) if self._explaining is not None else []
        return pb.ListExplainResponse(rules=[_explain_rule(rule) for rule in rules])

    async def StopExplain(self, request: pb.StopExplainRequest, context: grpc.aio.ServicerContext
                          ) -> pb.StopExplainResponse:
        caller = await self._caller(context, "StopExplain")
        stopped = self._explaining.stop(request.id) if self._explaining is not None else 0
        log.info("explain mode %s stopped by %s (%d rule(s))", request.id or "(all)", caller, stopped)
        return pb.StopExplainResponse(stopped=stopped)


def _explain_rule(rule: Any) -> pb.ExplainRule:
    return pb.ExplainRule(id=rule.id, subject=rule.subject, route=rule.route, mode=rule.mode,
                          remaining=rule.remaining, explained=rule.explained, expires=rule.until,
                          created_by=rule.created_by)


def _issuer_status(status: Any) -> pb.IssuerStatus:
    data = status if isinstance(status, dict) else getattr(status, "__dict__", {})
    return pb.IssuerStatus(
        issuer=str(data.get("issuer", "")), kids=[str(k) for k in data.get("kids", [])],
        last_refresh=float(data.get("last_refresh") or 0), last_error=str(data.get("last_error") or ""),
        stale=bool(data.get("stale")), refreshes=int(data.get("refreshes") or 0),
        failures=int(data.get("failures") or 0), status_json=json.dumps(data, default=str),
    )
