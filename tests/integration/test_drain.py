"""SIGTERM drains: health goes NOT_SERVING first, checks are still answered for the drain delay,
then the process exits. SIGUSR1 (a preStop hook) starts the draining without stopping."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_server.mesh.processes import Supervisor, free_port, wait_until
from tests.support.fleet import POLICY

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _start(supervisor: Supervisor, tmp_path: Path, workers: int = 1) -> tuple[object, str]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "policy.rego").write_text(POLICY)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"policies": str(tmp_path / "policies"), "metrics_addr": "",
                                  "shutdown": {"drain_delay": "5s", "grace": "5s"}}))
    address = f"127.0.0.1:{free_port()}"
    ready = tmp_path / "ready.json"
    child = supervisor.start("authz", [sys.executable, "-m", "authz_server.cli", "serve", "--config", str(config),
                                       "--addr", address, "--workers", str(workers), "--ready-file", str(ready)],
                             ready=ready.exists, timeout=60)
    return child, address


def _status(channel: grpc.Channel, service: str = "envoy.service.auth.v3.Authorization") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _check(channel: grpc.Channel) -> int:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method, request.attributes.request.http.path = "GET", "/ok/1"
    return external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5).status.code


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_reports_not_serving_answers_through_the_delay_then_exits(supervisor: Supervisor, tmp_path: Path,
                                                                           workers: int) -> None:
    child, address = _start(supervisor, tmp_path, workers)
    with grpc.insecure_channel(address) as channel:
        wait_until(lambda: _status(channel) == SERVING, timeout=30, what="SERVING")
        child.popen.send_signal(signal.SIGTERM)
        wait_until(lambda: _status(channel) == NOT_SERVING and _status(channel, "") == NOT_SERVING, timeout=10,
                   what="NOT_SERVING after SIGTERM")
        started = time.monotonic()
        assert _check(channel) == 0  # still deciding while Envoy moves its traffic away
        assert child.popen.poll() is None
    child.popen.wait(30)
    assert time.monotonic() - started >= 1.5 and child.popen.returncode == 0


def test_sigusr1_drains_without_stopping(supervisor: Supervisor, tmp_path: Path) -> None:
    child, address = _start(supervisor, tmp_path)
    with grpc.insecure_channel(address) as channel:
        wait_until(lambda: _status(channel) == SERVING, timeout=30, what="SERVING")
        child.popen.send_signal(signal.SIGUSR1)
        wait_until(lambda: _status(channel) == NOT_SERVING, timeout=10, what="NOT_SERVING after SIGUSR1")
        time.sleep(6)  # longer than the drain delay: SIGUSR1 alone never stops it
        assert child.popen.poll() is None and _check(channel) == 0
        started = time.monotonic()
        child.popen.send_signal(signal.SIGTERM)
    child.popen.wait(30)
    assert time.monotonic() - started < 5, "the delay had already passed while draining"
