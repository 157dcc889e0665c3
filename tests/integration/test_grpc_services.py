"""The gRPC port's other services, as grpcurl and Kubernetes probes use them: reflection and
health (Check and Watch), next to Authorization/Check, with a real client over loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz_server.config import Config
from tests.support.authz import running_app, write_policy

AUTHORIZATION = "envoy.service.auth.v3.Authorization"


async def test_reflection_health_and_check_answer_on_one_port(tmp_path: Path) -> None:
    write_policy(tmp_path / "policies", "package envoy.authz\nimport rego.v1\n"
                                        "allow if input.attributes.request.http.method == \"GET\"\n")
    async with running_app(Config(policies=str(tmp_path / "policies"), metrics_addr="")) as app:
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = [answer async for answer in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                      reflection_pb2.ServerReflectionRequest(file_containing_symbol=AUTHORIZATION)]))]
            listed = {service.name for service in answers[0].list_services_response.service}
            assert listed == {AUTHORIZATION, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
            assert answers[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe Check

            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", AUTHORIZATION):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=AUTHORIZATION), timeout=10)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()

            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            request = external_auth_pb2.CheckRequest()
            request.attributes.request.http.method = "GET"
            assert (await check(request, timeout=10)).status.code == 0
            request.attributes.request.http.method = "DELETE"
            assert (await check(request, timeout=10)).status.code == 7  # PERMISSION_DENIED


async def test_health_follows_a_rejected_reload_and_the_good_one_after_it(tmp_path: Path) -> None:
    """NOT_SERVING for authz_server.PolicyReload while what is on disk is refused, SERVING for
    all three services again once a good set serves (reloads activate off the event loop)."""
    folder = tmp_path / "policies"
    write_policy(folder, "package envoy.authz\nimport rego.v1\nallow := true\n")
    reload_service = "authz_server.PolicyReload"

    async def statuses(health: health_pb2_grpc.HealthStub) -> list[int]:
        return [(await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=10)).status
                for s in ("", AUTHORIZATION, reload_service)]

    async def until(health: health_pb2_grpc.HealthStub, wanted: list[int]) -> None:
        for _ in range(600):  # a reload is polled every 0.25 s; a busy machine gets a minute
            if await statuses(health) == wanted:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"health stayed {await statuses(health)}, expected {wanted}")

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    async with running_app(Config(policies=str(folder), metrics_addr="")) as app:
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await until(health, [serving, serving, serving])
            write_policy(folder, "package envoy.authz\nimport rego.v1\nallow if {\n")  # does not compile
            await until(health, [serving, serving, not_serving])  # the last good set still answers
            write_policy(folder, "package envoy.authz\nimport rego.v1\nallow := false\n")
            await until(health, [serving, serving, serving])
            answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(external_auth_pb2.CheckRequest(),
                                                                                 timeout=10)
            assert answer.status.code == 7  # the new set decides
