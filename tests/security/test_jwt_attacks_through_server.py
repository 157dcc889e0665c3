"""The JWT attack corpus through the whole server pipeline: each case is denied with 401 and
its code in the answer Envoy gets, nothing reaches the policy, and the server keeps working."""

from __future__ import annotations

import json
from pathlib import Path

from authz_server.config import Config
from authz_server.envoy import check_request_from_json, check_response, facts_from_check_request
from authz_server.identity.oidc import IssuerConfig
from authz_server.server import build_app
from tests.security.test_jwt_attacks import CASES, CORPUS, NOW, build
from tests.support.authz import write_policy
from tests.support.jwt import issuer_jwks

# Allows anyone with a verified user: only the identity step stands between an attacker and 200.
# Cases that do not apply at the HTTP layer, and why.
NOT_AT_THE_HEADER = {
    # RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token — spaces after the scheme belong to the
    # header's grammar, so the token the validator sees has none (the validator case still holds).
    "leading-space",
}
POLICY = "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.identity.user.sub != \"\"\n"


def _check(token: str):  # type: ignore[no-untyped-def]
    return check_request_from_json({"attributes": {"request": {"http": {
        "method": "GET", "path": "/orders", "headers": {"authorization": f"Bearer {token}"}}}}})


async def test_every_attack_is_denied_by_the_server_and_it_stays_healthy(tmp_path: Path) -> None:
    write_policy(tmp_path / "policies", POLICY)
    jwks = tmp_path / "idp.jwks.json"
    jwks.write_text(json.dumps(issuer_jwks()))
    issuer = IssuerConfig.from_mapping({**CORPUS["defaults"]["policy"], "leeway": "30s", "jwks_file": str(jwks)},
                                       "issuers[0]")
    app = build_app(Config(policies=str(tmp_path / "policies"), addr="", metrics_addr="", issuers=(issuer,)))
    app.runtime.load()
    await app._start_identity()
    try:
        checked = 0
        for case in CASES:
            if "policy" in case or case.get("client_cert") == "bound" or case["id"] in NOT_AT_THE_HEADER:
                continue  # another issuer policy, a client certificate the server derives itself, or above
            token, _, _ = build(case)
            decision = await app.pipeline.decide(facts_from_check_request(_check(token)), now=NOW)
            answer = check_response(decision)
            assert not decision.allowed, case["id"]
            assert decision.phase == "identity" and answer.denied_response.status.code == 401, case["id"]
            expected = case.get("registry_expected", case["expected"])
            assert json.loads(answer.denied_response.body)["error"] == expected, f"{case['id']}: {decision.reason}"
            checked += 1
        assert checked >= len(CASES) * 3 // 4
        assert app.runtime.status.timeouts == 0
        good, _, _ = build({"id": "baseline"})
        after = await app.pipeline.decide(facts_from_check_request(_check(good)), now=NOW)
        assert after.allowed, after.reason  # still healthy: a good token is accepted
    finally:
        await app.stop(0)
