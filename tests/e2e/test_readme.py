"""Every command the README shows runs as written: here, or (the long ones) in the test named
for it in ``ELSEWHERE``. A command added to the README without either fails this file.

The README's commands use fixed ports (9191, 8000, ...), so each runs in a network namespace
of its own (``unshare -n``): it never meets another process, another copy of this suite
included. Where namespaces are not allowed, those tests skip and say so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BIN = REPO / ".venv" / "bin"
WAIT = 60  # seconds a start may take on a slow, busy machine

# Commands the README names that take minutes, or a whole machine: the test that runs each.
ELSEWHERE = {
    "make test": ".ci/run (it is the suite)",
    "make install": ".ci/run (make test installs first)",
    "make demo": "tests/e2e/test_demo_mesh.py (authz-server demo: what make demo runs after installing)",
    "authz-server demo": "tests/e2e/test_demo_mesh.py",
    "authz-server demo --idp oidc-provider": "tests/e2e/test_signin_demo.py",
    "make evaluate": "tests/integration/test_evaluate_quick.py (authz-server evaluate --quick)",
    "authz-server evaluate": "tests/integration/test_evaluate_quick.py",
    "authz-server evaluate --out DIR": "tests/integration/test_evaluate_quick.py",
    "make bench": "tests/e2e/test_bench_smoke.py (every section, one-second runs)",
    "authz-server devidp serve": "tests/integration/test_oidc_devidp.py",
    "authz-server identity serve": "tests/integration/test_workload_cli.py",
}
# Named in the prose, run below.
HERE = {"authz-server serve", "authz-server policy test", "authz-server audit query", "authz-server render-configs",
        "authz-server serve --policies examples/local --http-addr 127.0.0.1:9192"}


def shell_blocks() -> list[list[str]]:
    blocks = []
    for match in re.finditer(r"```sh\n(.*?)```", README, re.S):
        blocks.append([line.strip() for line in match.group(1).splitlines() if line.strip()])
    return blocks


def command(line: str) -> str:
    """The line without its trailing comment."""
    return re.split(r"\s{2,}#\s", line, maxsplit=1)[0].strip()


def inline_commands() -> set[str]:
    spans = re.findall(r"`((?:make|authz-server) [^`]+)`", README.replace("\n", " "))
    return {re.sub(r"\s+", " ", span).strip() for span in spans}


def block_with(first: str) -> list[str]:
    for block in shell_blocks():
        if any(command(line).startswith(first) for line in block):
            return [command(line) for line in block]
    raise AssertionError(f"no README block runs {first!r}")


def netns_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0


NETNS = netns_available()
needs_netns = pytest.mark.skipif(not NETNS, reason="needs a network namespace of its own (unshare -n, as root) "
                                                   "so the README's fixed ports never meet another process's")


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A working folder that looks like the repository's, for commands run from it."""
    for name in ("policies", "examples", "envoy", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    config = re.search(r"### Configuration\n\n```yaml\n(.*?)```", README, re.S)
    assert config is not None
    (tmp_path / "authz.yaml").write_text(config.group(1))
    return tmp_path


def in_netns(script: str, cwd: Path, timeout: float = 4 * WAIT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    return subprocess.run(["unshare", "-n", "bash", "-c", "ip link set lo up\n" + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=4 * WAIT)


# -- every command is accounted for

def test_every_readme_command_is_run_here_or_by_a_named_test() -> None:
    assert shell_blocks()[0] == [
        "make demo    # creates .venv, installs, brings up the demo on this machine and walks through it",
        "make test    # creates .venv, installs, runs the whole test suite"], "the README opens with the two commands"
    in_blocks = {command(line) for block in shell_blocks()[1:] for line in block}
    tested_here = set(SERVE_LINES) | {CONFIG_LINE, *OTHER_LINES} | set(block_with(". .venv/bin/activate"))
    assert in_blocks <= tested_here, f"README commands no test runs: {in_blocks - tested_here}"
    inline = inline_commands() | {"authz-server demo --idp oidc-provider"}
    untested = {c for c in inline if c not in ELSEWHERE and c not in HERE and c not in in_blocks}
    assert not untested, f"README commands no test runs: {untested}"
    for runner in ELSEWHERE.values():
        assert (REPO / runner.split(" ")[0]).exists(), runner


# -- Running it

SERVE_LINES = [command(line) for line in block_with("authz-server serve --policies policies/")
               if command(line).startswith("authz-server serve") and "--config" not in line]
CONFIG_LINE = "authz-server serve --config authz.yaml"
OTHER_LINES = [command(line) for line in block_with("authz-server serve --policies policies/")
               if not command(line).startswith("authz-server serve")] + block_with("authz-server audit query")

SERVE_UNTIL_STOPPED = """
{command} > serve.log 2>&1 &
pid=$!
for i in $(seq {ticks}); do
  grep -q "serving " serve.log && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
grep -q "serving " serve.log || {{ cat serve.log; exit 3; }}
kill -TERM $pid
wait $pid
code=$?
cat serve.log
exit $code
"""


@needs_netns
@pytest.mark.parametrize("line", SERVE_LINES)
def test_each_serve_line_serves_and_stops_cleanly(line: str, sandbox: Path) -> None:
    done = in_netns(SERVE_UNTIL_STOPPED.format(command=line, ticks=WAIT * 10), sandbox)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    if "unix:" in line:
        assert "serving addr=unix:authz.sock" in done.stdout


def test_the_readme_config_copied_as_is_stops_with_one_line(sandbox: Path) -> None:
    assert CONFIG_LINE in {command(line) for block in shell_blocks() for line in block}
    done = run(CONFIG_LINE, sandbox)
    assert done.returncode == 2
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("authz-server: config error: ") and f"`{said}`" in README, said  # what the README says
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("line", OTHER_LINES)
def test_the_policy_and_audit_lines(line: str, sandbox: Path) -> None:
    (sandbox / "audit.jsonl").touch()
    done = run(line, sandbox)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if "policy test" in line:
        assert "PASS:" in done.stdout
    if "policy eval" in line:
        assert '"value": "medium"' in done.stdout
    if "audit query" in line:
        assert "decisions for alice" in done.stdout


def test_render_configs_writes_what_is_committed(tmp_path: Path) -> None:
    done = run(f"authz-server render-configs --out {tmp_path}", REPO)
    assert done.returncode == 0, done.stderr
    for written in tmp_path.rglob("*.yaml"):
        assert written.read_text() == (REPO / "envoy" / written.relative_to(tmp_path)).read_text(), written


# -- Behind your own Envoy

READY = "for i in $(seq {ticks}); do curl -sf -o /dev/null http://127.0.0.1:8000/public/hello && break; sleep 0.1; done\n"


def behind_your_own_envoy(block: list[str]) -> str:
    """The block as a script, waiting (as a person would) for the three to start before asking."""
    first_curl = next(i for i, line in enumerate(block) if line.startswith("curl"))
    lines = block[:first_curl] + [READY.format(ticks=WAIT * 10) + "echo ===="]
    for line in block[first_curl:]:
        lines += [line, "echo", "echo ===="] if line.startswith("curl") else [line]
    return "\n".join(lines) + "\nwait\n"


def answers(stdout: str) -> list[str]:
    return [part.strip() for part in stdout.split("====")[1:] if part.strip()]


def check_answers(stdout: str) -> None:
    public, denied, admin = answers(stdout)
    assert public.startswith("HTTP/1.1 200 OK"), public
    assert '"x-checked-by": "authz-server"' in public and '"x-authz-decision-id": "' in public
    assert denied.startswith("HTTP/1.1 403 Forbidden"), denied
    assert denied.endswith("denied by authz-server: only GET /public/... and, with x-role: admin, /admin/... pass")
    assert "x-authz-decision-id: " in denied
    assert admin.startswith("HTTP/1.1 200 OK") and '"x-role": "admin"' in admin, admin


@needs_netns
def test_behind_your_own_envoy_runs_as_written(sandbox: Path) -> None:
    block = block_with(". .venv/bin/activate")
    done = in_netns(behind_your_own_envoy(block), sandbox)
    assert done.returncode == 0, done.stdout + done.stderr
    check_answers(done.stdout)
    assert "Traceback" not in done.stderr


@needs_netns
def test_behind_your_own_envoy_in_http_mode(sandbox: Path) -> None:
    """The README's variant: the same with --http-addr and envoy/local-http.yaml."""
    variant = "authz-server serve --policies examples/local --http-addr 127.0.0.1:9192"
    assert f"`{variant}`" in README.replace("\n", " ")
    block = [f"{variant} &" if line.startswith("authz-server serve") else line.replace("local-grpc", "local-http")
             for line in block_with(". .venv/bin/activate")]
    done = in_netns(behind_your_own_envoy(block), sandbox)
    assert done.returncode == 0, done.stdout + done.stderr
    check_answers(done.stdout)
