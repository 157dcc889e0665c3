"""Mid-traffic, the dependencies go one after another: the PostgreSQL audit sink becomes
unreachable, the Redis session store dies, the policy folder is replaced by a set that does
not compile. Then all come back.

Through all of it, every request is answered, none is allowed that the policy and the
sessions deny (a stranger, a revoked session, an anonymous caller), the audit file records
every decision, and once the database is reachable again every record held for it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import AsyncIterator

import grpc
import psycopg
import pytest

from authz_server.audit.sinks.postgres import split_url
from authz_server.config import Config, SessionsConfig
from authz_server.identity.sessions import session_key
from authz_server.mesh.processes import Supervisor, free_port
from tests.support.audit import (AUDIT_POLICY, TRUST_DOMAIN, check_request_bytes, drop_table, eventually, grpc_check,
                                 jsonl, open_session, unique_table, workload, write_audit_policy)
from tests.support.authz import running_app, write_policy
from tests.support.postgres import available as postgres_available
from tests.support.postgres import postgres_url
from tests.support.redis import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.skipif(not postgres_available(), reason="PostgreSQL is not installed")]

ALICE = workload("alice-svc")
OK = 0


class CuttableLink:
    """A TCP relay to a server: ``cut`` refuses new connections and resets the open ones, as a
    network partition or a dead host does for the client; ``restore`` listens again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._open |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        self._open -= {client_writer, server_writer}


@contextlib.asynccontextmanager
async def audit_database() -> AsyncIterator[tuple[str, str, CuttableLink]]:
    """A table of its own on the test PostgreSQL: its URL, the same reached through a link the
    test can cut, and the link."""
    direct = f"{postgres_url()}?table={unique_table()}"
    host_port = direct.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    link = CuttableLink(host, int(port))
    await link.restore()
    try:
        yield direct, direct.replace(host_port, f"127.0.0.1:{link.port}"), link
    finally:
        with contextlib.suppress(Exception):
            await link.cut()
        drop_table(direct)


def rows(direct_url: str) -> int:
    conninfo, table = split_url(direct_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (table[-1],)).fetchone()
        if exists is None or exists[0] is None:
            return 0
        row = conn.execute(f'SELECT count(*) FROM "{table[-1]}"').fetchone()
        return int(row[0]) if row else 0


async def test_audit_sink_store_and_policy_folder_die_mid_traffic(tmp_path: Path, supervisor: Supervisor) -> None:
    # a store that keeps what it acknowledged (append-only file, fsync always), as production Redis
    # does: killed and started again, it has its sessions and revocations back
    redis_server = RedisServer(supervisor, free_port(), extra=("--appendonly", "yes", "--appendfsync", "always")).start()
    policies = write_audit_policy(tmp_path / "policies")
    audit_file = tmp_path / "audit.jsonl"
    async with audit_database() as (direct_url, relayed_url, link):
        config = Config(policies=str(policies), metrics_addr="", trust_domains=(TRUST_DOMAIN,),
                        sessions=SessionsConfig(store=redis_server.url),
                        audit=(f"file:{audit_file}", relayed_url))
        async with running_app(config) as app:
            store, now = app.identity.store, time.time()
            alice = await open_session(store, subject="alice", spiffe_id=ALICE, now=now)
            mallory = await open_session(store, subject="mallory", spiffe_id=ALICE, now=now)
            revoked = await open_session(store, subject="alice", spiffe_id=ALICE, now=now)
            assert await store.revoke(session_key(revoked), now=now)

            # what each kind may get: the policy's allow; a deny (the policy's, or because a dependency
            # is down: fail closed); "either" only for alice while her session cannot be looked up
            kinds = {
                "public": (check_request_bytes("/public/1"), "allow"),
                "alice": (check_request_bytes("/orders/7", principal=ALICE, headers={"x-session-id": alice}),
                          "either"),
                "mallory": (check_request_bytes("/orders/7", principal=ALICE,
                                                headers={"x-session-id": mallory}), "deny"),
                "revoked": (check_request_bytes("/orders/7", principal=ALICE,
                                                headers={"x-session-id": revoked}), "deny"),
                "anonymous": (check_request_bytes("/orders/7"), "deny"),
                "busy": (check_request_bytes("/busy"), "deny"),
            }
            sent: Counter[str] = Counter()
            seen: dict[str, Counter[int]] = {kind: Counter() for kind in kinds}

            async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
                check = grpc_check(channel)

                async def round_of_traffic(times: int = 10) -> None:
                    names = [kind for kind in kinds for _ in range(times)]
                    answers = await asyncio.gather(*(check(kinds[kind][0]) for kind in names))
                    for kind, answer in zip(names, answers):
                        sent[kind] += 1
                        seen[kind][answer.status.code] += 1
                        expected = kinds[kind][1]
                        assert expected == "either" or (answer.status.code == OK) == (expected == "allow"), \
                            f"{kind}: {answer}"

                await round_of_traffic()
                assert seen["alice"] == Counter({OK: 10})  # all up: the session decides
                first = sum(sent.values())
                await eventually(lambda: rows(direct_url) == first, timeout=60, what="the first records to land")

                await link.cut()  # the audit database is gone
                await round_of_traffic()
                redis_server.kill()  # and the session store (SIGKILL)
                await round_of_traffic()
                write_policy(policies, "package envoy.authz\nimport rego.v1\nallow if {\n")  # and the policy set
                await eventually(lambda: bool(app.runtime.status.last_error), timeout=60,
                                 what="the broken policy set to be refused")
                await round_of_traffic()
                assert rows(direct_url) == first  # the link was cut: nothing reached the database

                await link.restore()
                redis_server.start()
                write_policy(policies, AUDIT_POLICY)
                await eventually(lambda: not app.runtime.status.last_error, timeout=60,
                                 what="the good policy set to serve again")

                async def alice_allowed() -> bool:
                    return (await check(kinds["alice"][0])).status.code == OK

                deadline = time.monotonic() + 60
                while not await alice_allowed():  # the store reconnects on its own
                    assert time.monotonic() < deadline, "sessions did not resolve again after Redis came back"
                    await asyncio.sleep(0.1)
                sent["alice"] += 1
                seen["alice"][OK] += 1
                await round_of_traffic()
                assert seen["public"][OK] == sent["public"]  # the last good set answered throughout

            total = sum(sent.values())
            await eventually(lambda: rows(direct_url) >= total, timeout=120,
                             what="the records held while the database was away to land")
            assert rows(direct_url) == total

        records = list(jsonl(audit_file))  # the app has stopped: the file is flushed
        assert len(records) == total
        assert len({r["decision_id"] for r in records}) == total
        assert sum(r["allowed"] for r in records) == sum(seen[kind][OK] for kind in kinds)
