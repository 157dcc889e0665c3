from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from authz_server.mesh.processes import Supervisor
from tests.support.redis import ClusterGroup, RedisServer, SentinelGroup, start_redis


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """Children started through this are stopped when the test ends, pass or fail."""
    with Supervisor(tmp_path / "logs") as sup:
        yield sup


@pytest.fixture
def redis_server(supervisor: Supervisor) -> RedisServer:
    return start_redis(supervisor)


@pytest.fixture
def sentinel_group(supervisor: Supervisor) -> SentinelGroup:
    """A primary, two replicas and three sentinels, private to the test (it may kill them).

    A primary is down after 2 s without an answer, not the benchmark's 1 s: on the test suite's
    busy 2-core machine a sentinel starved for a second took the primary it had just switched to
    for down and failed over a second time (a fresh-clone CI run, 2026-12-07 10:47, sentinel log:
    ``+switch-master`` to the promoted replica, then ``+sdown`` of it 1.02 s later and a new
    election), refusing sign-ins after the store was back from the first failover."""
    return SentinelGroup(supervisor, down_after_ms=2000).start()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGroup]:
    """Three shards with a replica each, shared by a module's tests (which must not break it)."""
    with Supervisor(tmp_path_factory.mktemp("redis-cluster") / "logs") as sup:
        yield ClusterGroup(sup).start()
