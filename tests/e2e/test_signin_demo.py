"""``authz-server demo --idp oidc-provider``: every step of the sign-in tour as promised, and
nothing left running after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_demo_mesh import processes_mentioning
from tests.support.oidc import needs_oidc_provider

pytestmark = [pytest.mark.e2e, needs_oidc_provider()]


def test_the_sign_in_tour_turns_out_as_it_says(tmp_path: Path) -> None:
    workdir = tmp_path / "signin-demo"
    done = subprocess.run([sys.executable, "-m", "authz_server.cli", "demo", "--idp", "oidc-provider",
                           "--workdir", str(workdir)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 7 steps turned out as the tour said." in done.stdout
    assert "dpop_replay" in done.stdout
    assert not processes_mentioning(str(workdir))
