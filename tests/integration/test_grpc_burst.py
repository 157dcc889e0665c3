"""A burst of Checks larger than gRPC core's default pending-call limits (issue 23, item 10):
every call gets a decision; none comes back CANCELLED before one. Real gRPC over loopback."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import replace
from pathlib import Path

import grpc

from authz_server.config import Config
from authz_server.decision import DecisionSettings
from tests.support.audit import check_request_bytes, grpc_check
from tests.support.authz import running_app, write_policy

BURST = 2_000  # 143-182 of these came back CANCELLED with core's defaults (1,000 soft, 3,000 hard)


async def test_two_thousand_concurrent_checks_all_get_a_decision(tmp_path: Path) -> None:
    write_policy(tmp_path / "policies", "package envoy.authz\nimport rego.v1\n"
                                        "allow if input.parsed_path[0] == \"public\"\n")
    # A deadline this loose keeps a busy test machine from turning slow evaluations into denies:
    # what is checked here is that each call reaches the pipeline at all.
    config = Config(policies=str(tmp_path / "policies"), addr="127.0.0.1:0", metrics_addr="",
                    decision=replace(DecisionSettings(), policy_timeout=60.0))
    async with running_app(config) as app:
        async with grpc.aio.insecure_channel(app.bound["addr"]) as channel:
            check = grpc_check(channel)
            await check(check_request_bytes("/public/warm-up"), timeout=60)
            outcomes: collections.Counter[str] = collections.Counter()

            async def one(index: int) -> None:
                try:
                    answer = await check(check_request_bytes(f"/public/{index}"), timeout=120)
                    outcomes["allowed" if answer.status.code == 0 else f"denied {answer.status.code}"] += 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[exc.code().name] += 1

            await asyncio.gather(*(one(i) for i in range(BURST)))
    assert outcomes == {"allowed": BURST}
