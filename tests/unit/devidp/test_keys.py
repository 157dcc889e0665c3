"""The dev provider's key rotation: published before it signs, kept until its tokens expire."""

from __future__ import annotations

from authz_server.devidp.keys import KeyRing

T0 = 1_000_000.0


def kids(ring: KeyRing, now: float) -> set[str]:
    return {k.kid for k in ring.published(now)}


def test_scheduled_rotation_publishes_first_signs_later_and_keeps_the_old_key() -> None:
    ring = KeyRing(("ES256",), now=T0, rotation_period=3600, publish_ahead=600, keep_after_retire=360)
    first = ring.signing_key("ES256", T0)
    assert kids(ring, T0) == {first.kid}
    # before period - publish_ahead: nothing new
    assert kids(ring, T0 + 2999) == {first.kid}
    # at period - publish_ahead the successor is published but does not sign yet
    published = kids(ring, T0 + 3000)
    assert len(published) == 2 and first.kid in published
    (successor,) = published - {first.kid}
    assert ring.signing_key("ES256", T0 + 3599).kid == first.kid
    # at the period it signs; the old key stays published for keep_after_retire
    assert ring.signing_key("ES256", T0 + 3600).kid == successor
    assert kids(ring, T0 + 3600 + 359) == {first.kid, successor}
    assert kids(ring, T0 + 3600 + 360) == {successor}


def test_forced_rotation_still_publishes_ahead() -> None:
    ring = KeyRing(("RS256", "ES256"), now=T0, publish_ahead=60, keep_after_retire=120)
    before = {alg: ring.signing_key(alg, T0).kid for alg in ("RS256", "ES256")}
    new = {k.alg: k.kid for k in ring.rotate(T0 + 10)}
    assert set(new.values()) <= kids(ring, T0 + 10)
    assert {alg: ring.signing_key(alg, T0 + 69).kid for alg in before} == before
    assert {alg: ring.signing_key(alg, T0 + 70).kid for alg in before} == new
    assert kids(ring, T0 + 70 + 120) == set(new.values())


def test_without_rotation_the_key_stays() -> None:
    ring = KeyRing(("RS256",), now=T0)
    kid = ring.signing_key("RS256", T0).kid
    assert ring.signing_key("RS256", T0 + 10 * 365 * 86400).kid == kid


def test_jwks_holds_public_keys_only() -> None:
    ring = KeyRing(("RS256", "ES256"), now=T0)
    for jwk in ring.jwks(T0)["keys"]:
        assert "d" not in jwk and jwk["use"] == "sig" and jwk["alg"] in ("RS256", "ES256") and jwk["kid"]
