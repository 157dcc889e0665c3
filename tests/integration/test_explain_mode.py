"""Explain mode through the admin API (mTLS): an operator switches it on for a route, the next N
decisions there carry an explanation in the audit log (written by the real file sink), the
N+1th does not, and the rule is gone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from authz_server._proto import authz_admin_pb2 as admin_pb
from authz_server.config import AdminConfig, Config
from tests.integration.test_admin_and_mtls import POLICY, _check, operator_and_sidecar  # noqa: F401
from tests.integration.test_admin_and_mtls import pki  # noqa: F401 (a fixture)
from tests.support.audit import jsonl
from tests.support.authz import running_app, write_policy


async def test_the_next_n_decisions_of_a_route_are_explained_in_the_audit_log(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    ca, tls = pki
    write_policy(tmp_path / "policies", POLICY)
    log_file = tmp_path / "audit.jsonl"
    config = Config(policies=str(tmp_path / "policies"), metrics_addr="", tls=replace(tls, allowed_clients=()),
                    audit=(f"file:{log_file}",),
                    admin=AdminConfig(addr="127.0.0.1:0", allowed=("spiffe://example.org/ops",)))
    async with running_app(config) as app:
        async with operator_and_sidecar(app.bound, ca) as (admin, check):
            await check.Check(_check())  # decided and cached before the switch
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.StartExplain(admin_pb.StartExplainRequest(route="x", count=2))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            rule = await admin.StartExplain(admin_pb.StartExplainRequest(route="/x", count=2, mode="fails",
                                                                         ttl_seconds=120))
            assert rule.remaining == 2 and rule.created_by == "spiffe://example.org/ops"
            listed = await admin.ListExplain(admin_pb.ListExplainRequest())
            assert [r.id for r in listed.rules] == [rule.id]
            answers = [await check.Check(_check()) for _ in range(3)]
            assert list((await admin.ListExplain(admin_pb.ListExplainRequest())).rules) == []  # used up
            again = await admin.StartExplain(admin_pb.StartExplainRequest(subject="dana"))
            assert (await admin.StopExplain(admin_pb.StopExplainRequest(id=again.id))).stopped == 1
        assert app.audit is not None
        await app.audit.drain()
    ids = [a.dynamic_metadata["decision_id"] for a in answers]
    records = {r["decision_id"]: r for r in jsonl(log_file)}
    first, second, third = (records[i] for i in ids)
    for explained in (first, second):
        assert not explained["cached"] and explained["reason"] == "policy_denied"
        explanation = explained["explanation"]
        assert explanation["mode"] == "fails"
        assert explanation["because"].startswith("the default applied: data.envoy.authz.allow")
        assert json.dumps(explanation["rules"])
    assert third["cached"] and "explanation" not in third
