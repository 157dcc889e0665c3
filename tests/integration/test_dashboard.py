"""The Grafana dashboard only queries metrics a running authz-server really exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

from authz_server.config import Config
from authz_server.devidp.config import DevIdPConfig
from authz_server.devidp.provider import DevIdP
from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.identity.oidc import IssuerConfig
from authz_server.signals import SignalsConfig
from tests.support.authz import REPO, running_app, write_policy

DASHBOARD = REPO / "deploy" / "grafana" / "authz-server.json"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info")


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


async def test_every_dashboard_metric_is_exported(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bauthz_[a-z_]+", target["expr"])}
    assert len(queried) >= 15
    write_policy(tmp_path / "policies", "package envoy.authz\nimport rego.v1\nallow := true\n")
    async with DevIdP(DevIdPConfig.from_mapping({"addr": "127.0.0.1:0"})) as idp:
        config = Config(policies=str(tmp_path / "policies"), metrics_addr="127.0.0.1:0",
                        issuers=(IssuerConfig.from_mapping({"issuer": idp.issuer, "audiences": ["a"]}, "issuers[0]"),),
                        signals=SignalsConfig.from_mapping({"rate": {"per_identity": {"rate": 10}}}),
                        audit=(f"file:{tmp_path / 'audit.jsonl'}",))
        async with running_app(config) as app:
            facts = facts_from_check_request(check_request_from_json(
                {"attributes": {"request": {"http": {"method": "GET", "path": "/"}}}}))
            await app.pipeline.decide(facts, now=time.time())
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://{app.bound['metrics_addr']}/metrics")).text
    exported = {_base(name) for name in re.findall(r"^(authz_[a-z_]+)", text, re.M)}
    missing = sorted(name for name in queried if _base(name) not in exported)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    assert dashboard["uid"] == "authz-server" and all(p["datasource"]["uid"] == "${datasource}"
                                                       for p in dashboard["panels"])
