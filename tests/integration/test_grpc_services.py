"""The gRPC port's other services, as grpcurl and Kubernetes probes use them: reflection and
health (Check and Watch), next to Authorization/Check, with a real client over loopback."""

from __future__ import annotations

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
