"""Envoy SDS on the workload's Unix socket, driven by a raw grpc.aio client the way Envoy drives
it: SPIRE's names, the ``ALL`` SPIFFE validator config, pushes on rotation, ACK and NACK, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from authz_server.workload import IdentityConfig, IdentityServer
from authz_server.workload.sds import SECRET_TYPE_URL
from tests.support.sds import secrets_of

A = "spiffe://example.org/a"
TIMEOUT = 10


@pytest.fixture
async def identity(tmp_path: Path) -> AsyncIterator[IdentityServer]:
    config = IdentityConfig.from_dict({
        "state_dir": "state", "svid_ttl": "1h",
        "trust_domains": [{"name": "example.org", "federates_with": ["partner.org"]}, {"name": "partner.org"},
                          {"name": "evil.org"}],
        "workloads": [{"name": "a", "spiffe_id": A, "socket": "run/a.sock"}],
    }, base_dir=tmp_path)
    async with IdentityServer(config) as server:
        yield server


class Stream:
    """One StreamSecrets call, written to and read from like Envoy does."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()

    async def send(self, *names: str, version: str = "", nonce: str = "", error: str = "") -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE_URL, resource_names=list(names),
                                                 version_info=version, response_nonce=nonce)
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        await self.call.write(request)

    async def receive(self) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.call.read(), TIMEOUT)

    async def ack(self, response: discovery_pb2.DiscoveryResponse, *names: str) -> None:
        await self.send(*names, version=response.version_info, nonce=response.nonce)


def serial(secret: secret_pb2.Secret) -> int:
    return x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes).serial_number


def validator(secret: secret_pb2.Secret) -> dict[str, int]:
    config = spiffe_pb2.SPIFFECertValidatorConfig()
    assert secret.validation_context.custom_validator_config.typed_config.Unpack(config)
    return {td.name: len(x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes)) for td in config.trust_domains}


async def channel_to(identity: IdentityServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel("unix:" + identity.sockets["a"])


async def test_certificate_and_all_then_push_on_rotation(identity: IdentityServer) -> None:
    async with await channel_to(identity) as channel:
        stream = Stream(channel)
        await stream.send(A, "ALL")
        first = await stream.receive()
        secrets = secrets_of(first)
        assert set(secrets) == {A, "ALL"} and first.type_url == SECRET_TYPE_URL and first.nonce
        assert serial(secrets[A]) == identity.snapshot("a").svid.serial_number
        assert secrets["ALL"].validation_context.custom_validator_config.name == "envoy.tls.cert_validator.spiffe"
        assert validator(secrets["ALL"]) == {"example.org": 1, "partner.org": 1}
        await stream.ack(first, A, "ALL")

        assert await identity.rotate_now("a") == 1
        pushed = await stream.receive()
        assert int(pushed.version_info) > int(first.version_info) and pushed.nonce != first.nonce
        assert serial(secrets_of(pushed)[A]) == identity.snapshot("a").svid.serial_number != serial(secrets[A])
        await stream.ack(pushed, A, "ALL")

        await identity.rotate_ca("partner.org", activate_after=60)
        pushed = await stream.receive()
        assert validator(secrets_of(pushed)["ALL"]) == {"example.org": 1, "partner.org": 2}
        stream.call.cancel()


async def test_nack_is_not_answered_with_the_same_secret(identity: IdentityServer) -> None:
    async with await channel_to(identity) as channel:
        stream = Stream(channel)
        await stream.send(A)
        first = await stream.receive()
        await stream.send(A, version="", nonce=first.nonce, error="Failed to load certificate chain")
        # a stale request (old nonce) is ignored too
        await stream.send(A, "ALL", nonce="not-a-nonce-we-sent")
        (server_stream,) = identity._sds["a"].streams
        for _ in range(600):  # both read by the server before the rotation (a busy machine reads late)
            if (server_stream.counters.nacks, server_stream.counters.stale) == (1, 1):
                break
            await asyncio.sleep(0.05)
        assert (server_stream.counters.nacks, server_stream.counters.stale) == (1, 1)
        # the next thing on the stream is the next rotation, not a re-send of the rejected version
        assert await identity.rotate_now("a") == 1
        after = await stream.receive()
        assert set(secrets_of(after)) == {A}
        assert serial(secrets_of(after)[A]) != serial(secrets_of(first)[A])
        assert after.version_info == str(int(first.version_info) + 1)
        assert server_stream.last_error == "Failed to load certificate chain"
        # names changed on the current nonce: answered at once
        await stream.send(A, "ROOTCA", version=after.version_info, nonce=after.nonce)
        assert set(secrets_of(await stream.receive())) == {A, "ROOTCA"}
        stream.call.cancel()


async def test_names_the_workload_may_not_have_end_the_stream(identity: IdentityServer) -> None:
    async with await channel_to(identity) as channel:
        stream = Stream(channel)
        await stream.send(A, "spiffe://example.org/b", "evil.org")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.receive()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not authorized" in (caught.value.details() or "")
        # the socket still serves a good stream
        good = Stream(channel)
        await good.send("default", "spiffe://partner.org")
        assert set(secrets_of(await good.receive())) == {"default", "spiffe://partner.org"}
        good.call.cancel()


async def test_fetch_and_delta(identity: IdentityServer) -> None:
    async with await channel_to(identity) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        response = await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(
            type_url=SECRET_TYPE_URL, resource_names=[A, "ROOTCA"]), timeout=TIMEOUT)
        assert set(secrets_of(response)) == {A, "ROOTCA"}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(resource_names=["spiffe://example.org/b"]),
                                    timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(
                type_url="type.googleapis.com/envoy.config.listener.v3.Listener"), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        delta = stub.DeltaSecrets()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(delta.read(), TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_garbage_does_not_hurt_the_server(identity: IdentityServer) -> None:
    async with await channel_to(identity) as channel:
        raw = channel.stream_stream("/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
                                    request_serializer=None, response_deserializer=None)
        call = raw()
        await call.write(b"\xff\xfe\x00garbage")
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(call.read(), TIMEOUT)
        stream = Stream(channel)
        await stream.send(A)
        assert set(secrets_of(await stream.receive())) == {A}
        stream.call.cancel()
