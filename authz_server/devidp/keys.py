"""The dev provider's signing keys and their rotation, as pure state over a ``now`` passed in.

Rotation follows the order relying parties need (OpenID Connect Core §10.1.1, "Rotation of
Asymmetric Signing Keys"): a new key is published in the JWKS first and only starts signing
``publish_ahead`` later, so caches pick it up before any token needs it; the key it replaces
stays published until every token it signed has expired (``keep_after_retire``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..identity.jose import encode_jwt, public_jwk


def generate_private_key(alg: str) -> Any:
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"the dev provider signs with RS256 or ES256, not {alg!r}")


@dataclass(slots=True)
class SigningKey:
    alg: str
    private_key: Any = field(repr=False)
    published_at: float
    active_from: float
    retired_at: float | None = None
    kid: str = ""
    jwk: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.jwk = public_jwk(self.private_key.public_key(), alg=self.alg)  # kid: RFC 7638 thumbprint
        self.kid = self.jwk["kid"]


class KeyRing:
    """One active key per algorithm, at most one pending successor, and recently retired keys."""

    def __init__(self, algorithms: tuple[str, ...], *, now: float, rotation_period: float = 0.0,
                 publish_ahead: float = 600.0, keep_after_retire: float = 360.0) -> None:
        self.rotation_period = rotation_period
        self.publish_ahead = publish_ahead
        self.keep_after_retire = keep_after_retire
        self._active = {alg: SigningKey(alg, generate_private_key(alg), now, now) for alg in algorithms}
        self._pending: dict[str, SigningKey] = {}
        self._retired: list[SigningKey] = []

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self._active)

    def tick(self, now: float) -> None:
        """Advance the schedule to ``now``: activate due successors, publish new ones, drop old keys."""
        for alg, active in list(self._active.items()):
            pending = self._pending.get(alg)
            if pending is not None and now >= pending.active_from:
                active.retired_at = pending.active_from
                self._retired.append(active)
                self._active[alg] = active = pending
                del self._pending[alg]
            if (self.rotation_period and alg not in self._pending
                    and now >= active.active_from + self.rotation_period - self.publish_ahead):
                self._publish(alg, now)
        self._retired = [k for k in self._retired if now < (k.retired_at or now) + self.keep_after_retire]

    def _publish(self, alg: str, now: float) -> SigningKey:
        key = SigningKey(alg, generate_private_key(alg), now, now + self.publish_ahead)
        self._pending[alg] = key
        return key

    def rotate(self, now: float, algorithms: tuple[str, ...] | None = None) -> list[SigningKey]:
        """Publish a new key now for each algorithm; each signs from ``now + publish_ahead``.

        A successor that was published but never signed anything is simply replaced."""
        self.tick(now)
        return [self._publish(alg, now) for alg in (algorithms or self.algorithms)]

    def signing_key(self, alg: str, now: float) -> SigningKey:
        self.tick(now)
        try:
            return self._active[alg]
        except KeyError:
            raise ValueError(f"no signing key for {alg!r}; configured: {', '.join(self._active)}") from None

    def published(self, now: float) -> list[SigningKey]:
        """What the JWKS shows at ``now``: active, pending and not-yet-expired retired keys."""
        self.tick(now)
        return [*self._active.values(), *self._pending.values(), *self._retired]

    def jwks(self, now: float) -> dict[str, Any]:
        return {"keys": [dict(k.jwk) for k in self.published(now)]}


def sign_jwt(header: Mapping[str, Any], claims: Mapping[str, Any], key: SigningKey) -> str:
    """Compact JWS (RFC 7515 §7.1) of ``claims`` under ``key``; the header gets ``alg`` and ``kid``."""
    return encode_jwt(claims, key.private_key, key.alg, {**header, "kid": key.kid})
