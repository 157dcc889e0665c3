from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from authz_server.mesh.processes import Supervisor
from tests.support.redis import RedisServer, start_redis


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """Children started through this are stopped when the test ends, pass or fail."""
    with Supervisor(tmp_path / "logs") as sup:
        yield sup


@pytest.fixture
def redis_server(supervisor: Supervisor) -> RedisServer:
    return start_redis(supervisor)
