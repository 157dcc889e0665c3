"""The Envoy configs in envoy/ are what the code renders, and Envoy accepts every one."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_server.mesh.envoy import validate_config
from authz_server.mesh.render import rendered_files

ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"


def test_committed_configs_equal_the_rendering() -> None:
    rendered = rendered_files()
    for name, text in rendered.items():
        committed = ENVOY_DIR / name
        assert committed.exists(), f"envoy/{name} is missing: run `authz-server render-configs`"
        assert committed.read_text() == text, f"envoy/{name} is stale: run `authz-server render-configs`"


@pytest.mark.parametrize("path", sorted(ENVOY_DIR.glob("**/*.yaml")), ids=lambda p: p.name)
def test_envoy_accepts_config(path: Path) -> None:
    validate_config(path)
