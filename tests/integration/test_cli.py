"""The command line as a user drives it: the installed ``authz-server`` script in a child process.

* ``serve --config`` with a mistake stops at once, non-zero, with ONE line on stderr that
  names the key (or the file);
* ``serve`` with ``workers: 2`` answers Check on one port from both worker processes, and
  on SIGTERM exits 0 leaving no process behind;
* ``policy test DIR`` exits 0 when the tests pass, 1 naming the test that failed, and
  non-zero with one ``file:line:col`` line when a module does not parse;
* ``--help`` lists the commands.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.authz import REPO, copy_policies, write_policy

SCRIPT = Path(sys.executable).with_name("authz-server")
CHECK = "/envoy.service.auth.v3.Authorization/Check"


def authz_server(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


_PROGRESS = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO) ")


def problems(stderr: str) -> list[str]:
    """What stderr says is wrong: every line but INFO/DEBUG progress log records."""
    return [line for line in lines(stderr) if not _PROGRESS.match(line)]


def test_the_script_is_installed() -> None:
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not installed (pip install -e .)"


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = authz_server("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "policy", "demo", "identity"):
        assert f"\n    {command} " in result.stdout, f"{command} missing from --help:\n{result.stdout}"
    serve = authz_server("serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0
    for flag in ("--config", "--addr", "--policies", "--metrics-addr", "--workers", "--ready-file"):
        assert flag in serve.stdout
    nothing = authz_server(cwd=tmp_path)
    assert nothing.returncode == 2 and "COMMAND" in nothing.stderr  # no command: usage, not a traceback


# -- serve --config: a mistake is one line naming the key

def _valid(tmp_path: Path) -> dict:
    policies = copy_policies(REPO / "policies", tmp_path / "policies")
    return {"addr": "127.0.0.1:0", "metrics_addr": "", "policies": str(policies), "workers": 2}


CONFIG_MISTAKES = {
    # name: (change to a valid config, the key the one line must name)
    "unknown key": ({"adr": "127.0.0.1:9191"}, "adr"),
    "unknown nested key": ({"decision_cache": {"tll": "5s"}}, "decision_cache.tll"),
    "duration that is not one": ({"decision_cache": {"ttl": "soon"}}, "decision_cache.ttl"),
    "number that is text": ({"workers": "two"}, "workers"),
    "address without a port": ({"addr": "localhost"}, "addr"),
    "status out of range": ({"deny_status": 700}, "deny_status"),
    "query that is not a data reference": ({"query": "allow"}, "query"),
    "list of the wrong thing": ({"trust_domains": [{"name": "example.org"}]}, "trust_domains[0]"),
    "certificate file that does not exist": (
        {"tls": {"cert_file": "missing/cert.pem", "key_file": "missing/key.pem", "ca_file": "missing/ca.pem"}},
        "tls.cert_file"),
    # Read by each worker as it starts (the file is there, its content is not a certificate):
    # still one line, not one per worker.
    "certificate file that is not a certificate": (
        {"tls": {"cert_file": "junk.pem", "key_file": "junk.pem", "ca_file": "junk.pem"}}, "tls.cert_file"),
}


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES.values(), ids=CONFIG_MISTAKES.keys())
def test_a_config_mistake_stops_the_start_with_one_line_naming_the_key(tmp_path: Path,
                                                                       mistake: tuple[dict, str]) -> None:
    change, key = mistake
    config = tmp_path / "authz.yaml"
    config.write_text(yaml.safe_dump({**_valid(tmp_path), **change}))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    result = authz_server("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert len(problems(result.stderr)) == 1, f"expected one line, got:\n{result.stderr}"
    line = problems(result.stderr)[0]
    assert line.startswith("authz-server: config error: ") or line.startswith("authz-server: config_invalid: "), line
    assert f" {key}:" in line or f" {key} " in line, f"{key!r} not named in {line!r}"
    assert "Traceback" not in result.stderr


def test_a_missing_or_unreadable_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = authz_server("serve", "--config", "nowhere.yaml", cwd=tmp_path)
    assert missing.returncode != 0 and lines(missing.stderr) == [
        "authz-server: config error: cannot read config file 'nowhere.yaml': No such file or directory"]
    (tmp_path / "broken.yaml").write_text("addr: [127.0.0.1\n")
    broken = authz_server("serve", "--config", "broken.yaml", cwd=tmp_path)
    assert broken.returncode != 0 and len(lines(broken.stderr)) == 1
    assert "broken.yaml" in broken.stderr and "line 2" in broken.stderr, broken.stderr


def test_a_bad_flag_value_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text(yaml.safe_dump(_valid(tmp_path)))
    result = authz_server("serve", "--config", str(config), "--workers", "0", cwd=tmp_path)
    assert result.returncode != 0
    assert lines(result.stderr) == ["authz-server: config error: --workers: must be at least 1"]
    query = authz_server("serve", "--config", str(config), "--query", "data.envoy.authz.", cwd=tmp_path)
    assert query.returncode != 0 and len(lines(query.stderr)) == 1, query.stderr
    assert query.stderr.startswith("authz-server: config error: --query: "), query.stderr


# -- serve with two workers

def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(what: str, check: Callable[[], bool], timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None:
            raise AssertionError(f"authz-server exited ({process.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.05)


@dataclass
class Served:
    process: subprocess.Popen
    bound: dict
    workers: set[int]
    stderr: Path


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Served]:
    config = tmp_path / "authz.yaml"
    config.write_text(yaml.safe_dump({**_valid(tmp_path), "trust_domains": ["example.org"]}))
    ready, log = tmp_path / "ready.json", tmp_path / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([str(SCRIPT), "serve", "--config", str(config), "--ready-file", str(ready)],
                                   cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    served = Served(process, {}, set(), log)
    try:
        _wait_for("the ready file", ready.exists, 90, process, log)
        served.bound = json.loads(ready.read_text())
        served.workers = _children(process.pid)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for pid in served.workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _orders() -> bytes:
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.principal = "spiffe://example.org/frontend"
    request.attributes.context_extensions.update({"service": "orders", "sensitivity": "medium"})
    http = request.attributes.request.http
    http.method, http.path = "GET", "/orders"
    return request.SerializeToString()


def test_two_workers_answer_on_one_port_and_stop_cleanly_on_sigterm(two_workers: Served) -> None:
    process, bound, workers = two_workers.process, two_workers.bound, two_workers.workers
    assert bound["workers"] == 2 and bound["pid"] == process.pid
    assert len(workers) == 2, f"expected two worker processes, found {workers}"
    address = bound["addr"]
    assert not address.endswith(":0")

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=10,
            wait_for_ready=True)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    # Every new connection lands on one of the workers (SO_REUSEPORT); each worker's decision
    # ids start with its own random prefix, so two prefixes mean both answered.
    prefixes: set[str] = set()
    for _ in range(200):
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            check = channel.unary_unary(CHECK, request_serializer=None,
                                        response_deserializer=external_auth_pb2.CheckResponse.FromString)
            answer = check(_orders(), timeout=10, wait_for_ready=True)
        assert answer.status.code == 0, answer  # the shipped policy allows the frontend to GET /orders
        decision_id = next(h.header.value for h in answer.ok_response.headers if h.header.key == "x-authz-decision-id")
        prefixes.add(decision_id[:16])
        if len(prefixes) == 2:
            break
    assert len(prefixes) == 2, "every connection went to the same worker"

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    stderr = two_workers.stderr.read_text()
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "a worker outlived the server"
    host, _, port = address.rpartition(":")
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the port any more
        socket.create_connection((host, int(port)), timeout=5).close()


# -- policy test DIR

PASSING = """
package envoy.authz
import rego.v1
default allow := false
allow if input.attributes.request.http.method == "GET"
test_get_is_allowed if allow with input as {"attributes": {"request": {"http": {"method": "GET"}}}}
test_post_is_denied if {
    not allow with input as {"attributes": {"request": {"http": {"method": "POST"}}}}
}
"""


def test_policy_test_passes_with_exit_0(tmp_path: Path) -> None:
    write_policy(tmp_path / "ok", PASSING)
    result = authz_server("policy", "test", "ok", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: 2/2" in result.stdout
    shipped = authz_server("policy", "test", str(REPO / "policies"), cwd=tmp_path)
    assert shipped.returncode == 0 and "FAIL" not in shipped.stdout, shipped.stdout


def test_policy_test_fails_with_exit_1_naming_the_test(tmp_path: Path) -> None:
    write_policy(tmp_path / "bad", PASSING.replace("    not allow with input as", "    allow with input as"))
    result = authz_server("policy", "test", "bad", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in lines(result.stdout) if "FAIL" in line and "test_" in line]
    assert len(failed) == 1 and "test_post_is_denied" in failed[0], result.stdout
    assert "test_get_is_allowed" not in result.stdout  # only failures are listed
    assert "FAIL: 1/2" in result.stdout


def test_policy_test_on_a_syntax_error_says_where(tmp_path: Path) -> None:
    write_policy(tmp_path / "broken", "package envoy.authz\nimport rego.v1\n\nallow if {\n    input.x ==\n")
    result = authz_server("policy", "test", "broken", cwd=tmp_path)
    assert result.returncode not in (0, None)
    assert len(lines(result.stderr)) == 1, result.stderr
    assert "policy.rego:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    missing = authz_server("policy", "test", "nowhere", cwd=tmp_path)
    assert missing.returncode not in (0, None) and lines(missing.stderr) == [
        "error: policy folder 'nowhere' does not exist or is not a folder"]
