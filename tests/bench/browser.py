"""Issue 24's numbers, in process: a DPoP proof check (ES256), and what a browser's later
requests cost once signed in (a cookie session lookup), on traffic that does not repeat: many
users, ids in the paths, a fresh proof every time.

    .venv/bin/python -m tests.bench --only browser
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from authz_server.config import Config
from authz_server.envoy import check_request_from_json, facts_from_check_request
from authz_server.identity.dpop import DpopSettings, ProofChecker
from authz_server.identity.oidc import IssuerConfig
from authz_server.identity.sessions import Binding, Session, new_session_id, session_key
from authz_server.server import build_app
from tests.support.dpop import DpopClient
from tests.support.jwt import AUDIENCE, ISSUER, issuer_jwks

from .harness import table

USERS = 200
POLICY = 'package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.identity.user.sub != ""\n'


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def proof_checks(count: int = 4000, keys: int = 200) -> dict[str, float]:
    """``ProofChecker.check`` per proof: ``keys`` clients, every proof for its own URL."""
    checker = ProofChecker(DpopSettings(mode="allowed", algorithms=("ES256",)))
    clients = [DpopClient() for _ in range(keys)]
    now = time.time()
    proofs = [(clients[i % keys], f"https://api.test/orders/{i}") for i in range(count)]
    made = [(client.jkt, url, client.proof("GET", url, iat=now)) for client, url in proofs]
    first_sight = []
    for jkt, url, proof in made[:keys]:  # each key's first proof parses its jwk
        started = time.perf_counter()
        checker.check(proof, method="GET", url=url, now=now, bound_jkt=jkt)
        first_sight.append(time.perf_counter() - started)
    rounds = []
    for start in range(keys, count, (count - keys) // 5):
        batch = made[start:start + (count - keys) // 5]
        started = time.perf_counter()
        for jkt, url, proof in batch:
            checker.check(proof, method="GET", url=url, now=now, bound_jkt=jkt)
        rounds.append((time.perf_counter() - started) / max(len(batch), 1))
    # The ES256 signature alone (pyca/cryptography), in the same run: what the check cannot go below.
    client, url, proof = clients[0], made[0][1], made[0][2]
    head, body, sig = proof.split(".")
    from authz_server.identity.encoding import b64url_decode
    from authz_server.identity.jose import ALGORITHMS

    key, signing_input, signature = client.private_key.public_key(), f"{head}.{body}".encode(), b64url_decode(sig)
    raw = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(200):
            ALGORITHMS["ES256"].verify(key, signing_input, signature)
        raw.append((time.perf_counter() - started) / 200)
    return {"proof_check_us": _median_us(rounds), "proof_check_best_us": min(rounds) * 1e6,
            "first_proof_of_a_key_us": _median_us(first_sight), "es256_verify_us": _median_us(raw)}


def _request(path: str, headers: dict[str, str], browser: bool = True) -> Any:
    request = {"attributes": {"request": {"http": {"method": "GET", "path": path, "host": "shop.test",
                                                   "scheme": "https", "headers": {"user-agent": "bench", **headers}}}}}
    if browser:
        request["attributes"]["contextExtensions"] = {"browser": "true"}
    return check_request_from_json(request)


async def sessions(folder: Path, count: int = 5000) -> dict[str, float]:
    """Decisions for signed-in browsers (cookie) and DPoP-bound sessions, many users."""
    (folder / "policies").mkdir(parents=True, exist_ok=True)
    (folder / "policies" / "policy.rego").write_text(POLICY)
    (folder / "jwks.json").write_text(json.dumps(issuer_jwks()))
    app = build_app(Config(policies=str(folder / "policies"), addr="", metrics_addr="", issuers=(
        IssuerConfig.from_mapping({"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(folder / "jwks.json"),
                                   "dpop": "allowed"}, "issuers[0]"),)))
    app.runtime.load()
    store, pipeline = app.identity.store, app.pipeline
    now = time.time()
    cookies, bound = [], []
    for n in range(USERS):
        for jkt, out in (("", cookies), (DpopClient(), bound)):
            session_id = new_session_id()
            await store.create(Session(key=session_key(session_id), subject=f"user-{n}", issuer=ISSUER,
                                       claims={"sub": f"user-{n}"}, created=now, expires=now + 3600,
                                       idle_timeout=3600, binding=Binding(user_agent_sha256=""), generation=0,
                                       jkt=jkt.jkt if jkt else ""), now=now)
            out.append((session_id, jkt))
    results: dict[str, float] = {}

    async def measure(label: str, facts: list[Any]) -> None:
        """Decisions over ``facts`` after the first 200 (a warm-up, never measured twice)."""
        for warm in facts[:200]:
            await pipeline.decide(warm, now=now)
        facts = facts[200:]
        rounds = []
        size = len(facts) // 5
        for start in range(0, size * 5, size):
            started = time.perf_counter()
            for one in facts[start:start + size]:
                decision = await pipeline.decide(one, now=now)
                assert decision.allowed, decision.reason
            rounds.append((time.perf_counter() - started) / size)
        results[label] = _median_us(rounds)

    by_header = [facts_from_check_request(_request("/account", {"x-session-id": cookies[i % USERS][0]},
                                                   browser=False)) for i in range(count)]
    await measure("header_session_cached_page_us", by_header)  # the session path as it was before
    same_page = [facts_from_check_request(_request("/account", {"cookie": f"__Host-authz-session={cookies[i % USERS][0]}"}))
                 for i in range(count)]
    await measure("cookie_session_cached_page_us", same_page)
    pages = [facts_from_check_request(_request(f"/orders/{i}", {"cookie": f"__Host-authz-session={cookies[i % USERS][0]}"}))
             for i in range(count)]
    await measure("cookie_session_new_page_us", pages)
    dpop = []
    for i in range(count // 5 + 200):
        session_id, client = bound[i % USERS]
        url = f"https://shop.test/api/{i}"
        dpop.append(facts_from_check_request(_request(f"/api/{i}", {
            "x-session-id": session_id, "dpop": client.proof("GET", url, iat=now), "x-forwarded-proto": "https"},
            browser=False)))
    await measure("dpop_bound_session_us", dpop)
    await app.stop(0)
    return results


def run() -> tuple[dict[str, Any], str]:
    folder = Path(tempfile.mkdtemp(prefix="authz-bench-browser-"))
    proofs = proof_checks()
    decided = asyncio.run(sessions(folder))
    rows = [
        ["ES256 signature verify alone (pyca/cryptography), for scale", f"{proofs['es256_verify_us']:.0f}"],
        ["DPoP proof check, ES256 (a fresh proof per request, 200 keys)", f"{proofs['proof_check_us']:.0f}"],
        ["  the first proof of a key (its jwk parsed and thumbprinted)", f"{proofs['first_proof_of_a_key_us']:.0f}"],
        ["API client, x-session-id, same page again (the session path before this issue)",
         f"{decided['header_session_cached_page_us']:.1f}"],
        ["signed-in browser, same page again (cookie lookup, cached decision)",
         f"{decided['cookie_session_cached_page_us']:.1f}"],
        ["signed-in browser, a new page each time (cookie lookup + policy)", f"{decided['cookie_session_new_page_us']:.1f}"],
        ["DPoP-bound session, new path and proof each time", f"{decided['dpop_bound_session_us']:.0f}"],
    ]
    return {**proofs, **decided}, table("Browser sign-in and DPoP, in process (per decision)", ["what", "µs"], rows)


if __name__ == "__main__":
    print(run()[1])
