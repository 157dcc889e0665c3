"""Microseconds per JWT validation, RS256 and ES256: the pure validator (signature + claims)
and the same through IssuerRegistry (routing by iss, key-set lookup, async call).

    .venv/bin/python -m tests.bench.bench_jwt [--seconds 2]

A plain script, not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from authz_server.identity.oidc import IssuerConfig, IssuerRegistry
from authz_server.identity.tokens import IssuerPolicy, peek_issuer, validate_jwt
from tests.support.jwt import AUDIENCE, ISSUER, issuer_jwks, issuer_keyset, issuer_token


def per_call_us(call: Callable[[], object], seconds: float, rounds: int = 5) -> tuple[float, float]:
    """Median and best of ``rounds`` timed batches, in µs per call."""
    batch = 1
    while True:  # size a batch to about seconds / rounds
        started = time.perf_counter()
        for _ in range(batch):
            call()
        if time.perf_counter() - started > seconds / rounds / 4 or batch > 1 << 20:
            break
        batch *= 2
    batch *= 4
    results = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(batch):
            call()
        results.append((time.perf_counter() - started) / batch * 1e6)
    return statistics.median(results), min(results)


async def registry_us(token: str, now: float, count: int = 2000) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "jwks.json"
        path.write_text(json.dumps(issuer_jwks()))
        config = IssuerConfig.from_mapping({"issuer": ISSUER, "audiences": [AUDIENCE], "typ": "at+jwt",
                                            "jwks_file": str(path)}, "issuers[0]")
        registry = IssuerRegistry([config])
        results = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(count):
                await registry.validate(token, now=now)
            results.append((time.perf_counter() - started) / count * 1e6)
        await registry.close()
        return statistics.median(results), min(results)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_jwt")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    now = time.time()
    policy = IssuerPolicy(ISSUER, (AUDIENCE,), typ="at+jwt")
    keys = issuer_keyset()
    print(f"{'what':<40} {'median µs':>10} {'best µs':>10}")
    for alg in ("RS256", "ES256"):
        token = issuer_token(now, alg=alg, roles=["customer"], groups=["eu"])
        validate_jwt(token, policy, keys, now=now)  # must be valid before it is timed
        median, best = per_call_us(lambda: validate_jwt(token, policy, keys, now=now), args.seconds)
        print(f"{'validate_jwt ' + alg:<40} {median:>10.1f} {best:>10.1f}")
        median, best = asyncio.run(registry_us(token, now))
        print(f"{'IssuerRegistry.validate ' + alg:<40} {median:>10.1f} {best:>10.1f}")
    token = issuer_token(now)
    median, best = per_call_us(lambda: peek_issuer(token), args.seconds)
    print(f"{'peek_issuer':<40} {median:>10.1f} {best:>10.1f}")


if __name__ == "__main__":
    main()
