"""The JOSE library choice, measured: pyjwt (``PyJWS``/``PyJWK``) against joserfc, per RS256
and ES256 signature check and per JWK parse, on the same keys and tokens, in one run.

    .venv/bin/python -m tests.bench.bench_jose [--seconds 2]

Both libraries sit on pyca/cryptography, so the signature itself costs the same; what differs
is the work around it. ``validate_jwt`` (our strict parse and claim rules around the library's
verification) is timed too. joserfc is only needed to run this comparison.
"""

from __future__ import annotations

import argparse
import time

from authz_server.identity.encoding import b64url_decode
from authz_server.identity.tokens import IssuerPolicy, validate_jwt
from tests.bench.bench_jwt import per_call_us
from tests.support.jwt import AUDIENCE, ISSUER, issuer_keys, issuer_keyset, issuer_token


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_jose")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    import jwt
    try:
        from joserfc import jws as joserfc_jws
        from joserfc.jwk import ECKey, RSAKey
    except ImportError:
        raise SystemExit("bench_jose compares with joserfc: .venv/bin/pip install joserfc") from None

    now = time.time()
    policy = IssuerPolicy(ISSUER, (AUDIENCE,), typ="at+jwt")
    keys = issuer_keyset()
    rows: list[tuple[str, float, float]] = []
    for alg, pair in zip(("RS256", "ES256"), issuer_keys()):
        token = issuer_token(now, alg=alg)
        head, body, sig = token.split(".")
        signing_input, signature = f"{head}.{body}".encode(), b64url_decode(sig)
        pyjwk = jwt.PyJWK(dict(pair.jwk))
        pyjwt_alg = jwt.PyJWS().get_algorithm_by_name(alg)
        joserfc_key = (RSAKey if alg == "RS256" else ECKey).import_key(dict(pair.jwk))
        joserfc_alg = joserfc_jws.JWSRegistry().get_alg(alg)
        assert pyjwt_alg.verify(signing_input, pyjwk.key, signature)
        assert joserfc_alg.verify(signing_input, signature, joserfc_key)
        cases = {
            f"pyjwt  Algorithm.verify {alg}": lambda: pyjwt_alg.verify(signing_input, pyjwk.key, signature),
            f"joserfc Algorithm.verify {alg}": lambda: joserfc_alg.verify(signing_input, signature, joserfc_key),
            f"pyjwt  PyJWS.decode_complete {alg}": lambda: jwt.PyJWS().decode_complete(
                token, pyjwk.key, algorithms=[alg]),
            f"joserfc deserialize_compact {alg}": lambda: joserfc_jws.deserialize_compact(
                token, joserfc_key, algorithms=[alg]),
            f"pyjwt  PyJWK(parse) {alg}": lambda: jwt.PyJWK(dict(pair.jwk)),
            f"joserfc import_key(parse) {alg}": lambda: (RSAKey if alg == "RS256" else ECKey).import_key(
                dict(pair.jwk)),
            f"ours validate_jwt {alg}": lambda: validate_jwt(token, policy, keys, now=now),
        }
        for name, call in cases.items():
            rows.append((name, *per_call_us(call, args.seconds)))
    print(f"{'what':<42} {'median µs':>10} {'best µs':>10}")
    for name, median, best in rows:
        print(f"{name:<42} {median:>10.1f} {best:>10.1f}")


if __name__ == "__main__":
    main()
