"""The shipped policy set passes its own tests, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_default_policies_pass_their_tests() -> None:
    done = subprocess.run([sys.executable, "-m", "authz_server.cli", "policy", "test", str(REPO / "policies")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS:" in done.stdout and "FAIL" not in done.stdout


def test_quickstart_policy_passes_its_tests() -> None:
    done = subprocess.run([sys.executable, "-m", "authz_server.cli", "policy", "test",
                           str(REPO / "authz_server" / "mesh" / "policies" / "quickstart")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
