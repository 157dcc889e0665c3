"""The SPIFFE Workload API (``SpiffeWorkloadAPI``, protos from the ``spiffe`` package) for one workload.

As the SPIRE agent serves it: every call must carry the metadata ``workload.spiffe.io: true``
(SPIFFE Workload Endpoint §4.1 "the Workload API client MUST include the following metadata
... If the header is not present, the server MUST respond with an InvalidArgument status");
the X.509 and JWT bundle streams push whenever what they carry changes; bundles are keyed by
the trust domain's SPIFFE ID (``spiffe://example.org``) and include federated trust domains.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

import grpc
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

from ..errors import WorkloadError
from ..identity.spiffe import split_spiffe_id
from .feed import WorkloadFeed
from .issuer import WorkloadSnapshot
from .svid import SvidError

log = logging.getLogger(__name__)

SECURITY_HEADER = "workload.spiffe.io"
MAX_AUDIENCES = 32


async def require_security_header(context: grpc.aio.ServicerContext) -> None:
    values = [m.value for m in (context.invocation_metadata() or ()) if m.key == SECURITY_HEADER]
    if values != ["true"]:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")


def x509_svid_response(snapshot: WorkloadSnapshot) -> workload_pb2.X509SVIDResponse:
    svid = snapshot.svid
    return workload_pb2.X509SVIDResponse(
        svids=[workload_pb2.X509SVID(spiffe_id=svid.spiffe_id, x509_svid=svid.chain_der(),
                                     x509_svid_key=svid.key_der(), bundle=snapshot.bundle.x509_der())],
        federated_bundles={b.id: b.x509_der() for b in snapshot.federated.values()},
    )


def x509_bundles_response(snapshot: WorkloadSnapshot) -> workload_pb2.X509BundlesResponse:
    return workload_pb2.X509BundlesResponse(bundles={b.id: b.x509_der() for b in snapshot.bundles().values()})


def jwt_bundles_response(snapshot: WorkloadSnapshot) -> workload_pb2.JWTBundlesResponse:
    return workload_pb2.JWTBundlesResponse(
        bundles={b.id: json.dumps(b.jwks()).encode() for b in snapshot.bundles().values()})


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Serves the workload behind ``feed`` (the socket decides who that is)."""

    def __init__(self, feed: WorkloadFeed) -> None:
        self.feed = feed

    async def FetchX509SVID(self, request: workload_pb2.X509SVIDRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await require_security_header(context)
        snapshot: WorkloadSnapshot | None = self.feed.snapshot
        while snapshot is not None:
            yield x509_svid_response(snapshot)
            snapshot = await self.feed.next(snapshot.version)

    async def FetchX509Bundles(self, request: workload_pb2.X509BundlesRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await require_security_header(context)
        async for response in self._changes(x509_bundles_response):
            yield response

    async def FetchJWTBundles(self, request: workload_pb2.JWTBundlesRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await require_security_header(context)
        async for response in self._changes(jwt_bundles_response):
            yield response

    async def _changes(self, build: Any) -> AsyncIterator[Any]:
        """``build(snapshot)`` now, then again whenever it comes out different."""
        snapshot: WorkloadSnapshot | None = self.feed.snapshot
        previous = None
        while snapshot is not None:
            response = build(snapshot)
            if response != previous:
                yield response
                previous = response
            snapshot = await self.feed.next(snapshot.version)

    async def FetchJWTSVID(self, request: workload_pb2.JWTSVIDRequest,
                           context: grpc.aio.ServicerContext) -> workload_pb2.JWTSVIDResponse:
        await require_security_header(context)
        audience = list(request.audience)
        if not audience or not all(audience):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if len(audience) > MAX_AUDIENCES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_AUDIENCES} audiences")
        if request.spiffe_id:
            try:
                split_spiffe_id(request.spiffe_id)
            except WorkloadError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid requested SPIFFE ID: {exc.message}")
            if request.spiffe_id != self.feed.workload.spiffe_id:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        svid = self.feed.jwt_svid(audience)
        return workload_pb2.JWTSVIDResponse(svids=[workload_pb2.JWTSVID(spiffe_id=svid.spiffe_id, svid=svid.token)])

    async def ValidateJWTSVID(self, request: workload_pb2.ValidateJWTSVIDRequest,
                              context: grpc.aio.ServicerContext) -> workload_pb2.ValidateJWTSVIDResponse:
        await require_security_header(context)
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        try:
            validated = self.feed.validate_jwt_svid(request.svid, request.audience)
        except SvidError as exc:
            log.info("workload %s: JWT-SVID refused: %s", self.feed.workload.name, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.code}: {exc.message}")
        claims = dict(validated.claims)
        if isinstance(claims.get("aud"), str):
            claims["aud"] = [claims["aud"]]  # always a list, as SPIRE returns it
        struct = struct_pb2.Struct()
        struct.update(claims)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=validated.spiffe_id, claims=struct)
