"""Envoy's Secret Discovery Service (``envoy.service.secret.v3``) for one workload, with the
SPIRE agent's resource names, so sidecar configs are the same against SPIRE and against us.

=================================  =============================================================
resource name                      secret
=================================  =============================================================
the workload's SPIFFE ID           ``tls_certificate``: its X.509-SVID chain and key (PEM)
``default``                        the same, named ``default``
``ROOTCA``                         ``validation_context`` for the workload's own trust domain
``spiffe://<td>`` or ``<td>``      ``validation_context`` for that trust domain (own or federated)
``ALL``                            ``validation_context`` with Envoy's SPIFFE certificate validator
                                   (``SPIFFECertValidatorConfig``) listing own + federated domains
=================================  =============================================================

A single-domain validation context uses the SPIFFE validator too, as SPIRE does, unless the
node metadata says ``disable_spiffe_cert_validation: true`` (or Envoy is older than 1.18):
then it is a plain ``trusted_ca``. A name the workload may not have ends the stream with
INVALID_ARGUMENT ("workload is not authorized for the requested identities"), as in SPIRE.

The stream follows the xDS state-of-the-world protocol: every response has a new
``version_info`` and ``nonce``; a request whose ``response_nonce`` is not the last nonce sent
is stale and ignored; a request carrying ``error_detail`` is a NACK (logged and counted, not
answered again with the same content); a change of ``resource_names`` is answered at once;
a rotation is pushed as a new response when the secrets it carries actually changed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as _secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from .bundle import TrustBundle
from .feed import WorkloadFeed
from .issuer import WorkloadSnapshot

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
DEFAULT_SVID_NAME = "default"
DEFAULT_BUNDLE_NAME = "ROOTCA"
ALL_BUNDLES_NAME = "ALL"
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
DISABLE_SPIFFE_VALIDATION_KEY = "disable_spiffe_cert_validation"
WILDCARD = "*"
MAX_RESOURCE_NAMES = 64


class SdsError(Exception):
    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def tls_certificate_secret(name: str, snapshot: WorkloadSnapshot) -> secret_pb2.Secret:
    svid = snapshot.svid
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=svid.chain_pem()),
        private_key=base_pb2.DataSource(inline_bytes=svid.key_pem())))


def spiffe_validation_secret(name: str, bundles: list[TrustBundle]) -> secret_pb2.Secret:
    config = spiffe_pb2.SPIFFECertValidatorConfig(trust_domains=[
        spiffe_pb2.SPIFFECertValidatorConfig.TrustDomain(
            name=bundle.trust_domain, trust_bundle=base_pb2.DataSource(inline_bytes=bundle.x509_pem()))
        for bundle in sorted(bundles, key=lambda b: b.trust_domain)])
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        custom_validator_config=extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR, typed_config=_pack(config))))


def trusted_ca_secret(name: str, bundle: TrustBundle) -> secret_pb2.Secret:
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=bundle.x509_pem())))


def spiffe_validation_enabled(node: base_pb2.Node | None) -> bool:
    """SPIRE's rule: on unless the node metadata disables it or Envoy predates 1.18."""
    if node is None:
        return True
    field = node.metadata.fields.get(DISABLE_SPIFFE_VALIDATION_KEY)
    if field is not None:
        kind = field.WhichOneof("kind")
        if kind == "bool_value":
            return not field.bool_value
        if kind == "string_value" and field.string_value.lower() in ("true", "1", "t", "false", "0", "f"):
            return field.string_value.lower() not in ("true", "1", "t")
    if node.HasField("user_agent_build_version") and node.user_agent_build_version.HasField("version"):
        version = node.user_agent_build_version.version
        return version.major_number > 1 or (version.major_number == 1 and version.minor_number > 17)
    return True


def build_secrets(names: tuple[str, ...], snapshot: WorkloadSnapshot, *,
                  node: base_pb2.Node | None = None) -> list[secret_pb2.Secret]:
    """The secrets for ``names`` (all of them for a wildcard request); raises ``SdsError``."""
    spiffe = spiffe_validation_enabled(node)
    bundles = snapshot.bundles()

    def validation(name: str, bundle: TrustBundle) -> secret_pb2.Secret:
        return spiffe_validation_secret(name, [bundle]) if spiffe else trusted_ca_secret(name, bundle)

    wanted = [n for n in dict.fromkeys(names) if n]
    if not wanted or wanted == [WILDCARD]:
        return [*(validation(b.id, b) for b in bundles.values()), tls_certificate_secret(snapshot.spiffe_id, snapshot)]
    out: list[secret_pb2.Secret] = []
    refused: list[str] = []
    for name in wanted:
        domain = name[len("spiffe://"):] if name.startswith("spiffe://") else name
        if name in (snapshot.spiffe_id, DEFAULT_SVID_NAME):
            out.append(tls_certificate_secret(name, snapshot))
        elif name == DEFAULT_BUNDLE_NAME:
            out.append(validation(name, snapshot.bundle))
        elif name == ALL_BUNDLES_NAME:
            if not spiffe:
                raise SdsError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{ALL_BUNDLES_NAME!r} needs Envoy's SPIFFE certificate validator, which this node "
                               f"disables ({DISABLE_SPIFFE_VALIDATION_KEY})")
            out.append(spiffe_validation_secret(name, list(bundles.values())))
        elif domain in bundles and "/" not in domain:
            out.append(validation(name, bundles[domain]))
        else:
            refused.append(name)
    if refused:
        raise SdsError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"workload is not authorized for the requested identities {sorted(refused)!r}")
    return out


def discovery_response(secrets: list[secret_pb2.Secret], *, version_info: str = "",
                       nonce: str = "") -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(version_info=version_info, nonce=nonce, type_url=SECRET_TYPE_URL,
                                           resources=[_pack(s) for s in secrets])


@dataclass
class StreamCounters:
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    stale: int = 0


class SecretStream:
    """One StreamSecrets stream's protocol state. ``on_request``/``on_update`` return the
    response to send, or ``None``; they raise ``SdsError`` to end the stream."""

    def __init__(self, snapshot: WorkloadSnapshot, *, workload: str = "",
                 nonce: Callable[[], str] = lambda: _secrets.token_hex(8)) -> None:
        self.snapshot = snapshot
        self.workload = workload
        self.names: tuple[str, ...] | None = None
        self.node: base_pb2.Node | None = None
        self.version = 0
        self.version_info = ""
        self.last_nonce = ""
        self.counters = StreamCounters()
        self.last_error = ""
        self._nonce = nonce
        self._sent: list[bytes] | None = None
        self._subscribed = False

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> discovery_pb2.DiscoveryResponse | None:
        if request.type_url and request.type_url != SECRET_TYPE_URL:
            raise SdsError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"this server serves {SECRET_TYPE_URL}, not {request.type_url[:200]!r}")
        if len(request.resource_names) > MAX_RESOURCE_NAMES:
            raise SdsError(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_RESOURCE_NAMES} resource names")
        if request.HasField("node"):
            self.node = request.node
        first = self.names is None
        if self.last_nonce:
            if request.response_nonce != self.last_nonce:
                # xDS: a request with an outdated nonce refers to an older response; ignore it.
                self.counters.stale += 1
                return None
            if request.HasField("error_detail"):
                self.counters.nacks += 1
                self.last_error = request.error_detail.message
                log.warning("workload %s: Envoy rejected SDS version %s (%s): %s", self.workload, self.version_info,
                            ",".join(request.resource_names), request.error_detail.message)
            elif request.version_info == self.version_info:
                self.counters.acks += 1
        names = tuple(request.resource_names)
        if not first and set(names) == set(self.names or ()):
            return None
        self.names = names
        if not first and not names:
            self._subscribed = False  # unsubscribed from everything: nothing to push until names come back
            return None
        self._subscribed = True  # (an empty first request is a wildcard: everything, as SPIRE answers it)
        return self._respond(force=True)

    def on_update(self, snapshot: WorkloadSnapshot) -> discovery_pb2.DiscoveryResponse | None:
        self.snapshot = snapshot
        if not self._subscribed:
            return None
        return self._respond(force=False)

    def _respond(self, *, force: bool) -> discovery_pb2.DiscoveryResponse | None:
        secrets = build_secrets(self.names or (), self.snapshot, node=self.node)
        payload = [s.SerializeToString(deterministic=True) for s in secrets]
        if not force and payload == self._sent:
            return None
        self._sent = payload
        self.version += 1
        self.version_info = str(self.version)
        self.last_nonce = self._nonce()
        self.counters.responses += 1
        return discovery_response(secrets, version_info=self.version_info, nonce=self.last_nonce)


class SecretDiscoveryServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, feed: WorkloadFeed) -> None:
        self.feed = feed
        self.streams: set[SecretStream] = set()

    async def StreamSecrets(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await events.put(("request", request))
            except Exception as exc:  # an undecodable message, or the peer went away mid-message
                log.info("workload %s: SDS stream read failed: %r", self.feed.workload.name, exc)
                await events.put(("error", exc))
            finally:
                await events.put(("end", None))

        async def watch() -> None:
            version = self.feed.snapshot.version
            while True:
                snapshot = await self.feed.next(version)
                if snapshot is None:
                    await events.put(("end", None))
                    return
                version = snapshot.version
                await events.put(("update", snapshot))

        stream = SecretStream(self.feed.snapshot, workload=self.feed.workload.name)
        self.streams.add(stream)
        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while True:
                kind, item = await events.get()
                if kind == "end":
                    return
                if kind == "error":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed DiscoveryRequest")
                try:
                    response = stream.on_request(item) if kind == "request" else stream.on_update(item)
                except SdsError as exc:
                    log.warning("workload %s: SDS request refused: %s", self.feed.workload.name, exc.message)
                    await context.abort(exc.status, exc.message)
                if response is not None:
                    yield response
        finally:
            self.streams.discard(stream)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def FetchSecrets(self, request: discovery_pb2.DiscoveryRequest,
                           context: grpc.aio.ServicerContext) -> discovery_pb2.DiscoveryResponse:
        if request.type_url and request.type_url != SECRET_TYPE_URL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"this server serves {SECRET_TYPE_URL}, not {request.type_url[:200]!r}")
        if len(request.resource_names) > MAX_RESOURCE_NAMES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_RESOURCE_NAMES} resource names")
        try:
            secrets = build_secrets(tuple(request.resource_names), self.feed.snapshot,
                                    node=request.node if request.HasField("node") else None)
        except SdsError as exc:
            await context.abort(exc.status, exc.message)
        return discovery_response(secrets)

    async def DeltaSecrets(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        """Refused, as SPIRE's agent refuses it (its SDS v3 handler answers ``Unimplemented``): Envoy
        asks with ``StreamSecrets`` when its SDS config says ``api_type: GRPC``, as every config
        rendered here does (``mesh/sidecar.py``), and a secret set this small gains nothing from deltas."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeltaSecrets is not implemented; use StreamSecrets")
