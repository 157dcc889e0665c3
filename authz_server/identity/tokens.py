"""JWT validation, pure: no I/O, no clock (``now`` is passed in), one issuer's policy and keys.

Two named steps, in this order (pyjwt ``api_jws.py`` then ``api_jwt.py``; joserfc ``jwt.decode``
then ``JWTClaimsRegistry``):

1. ``verify_jws``: the compact JWS structure, its header, and the signature, with the key
   chosen by the issuer's allow-list and the ``kid``; the payload is not even parsed yet.
2. ``validate_claims``: the claims of a verified payload against the issuer's policy at ``now``.

``validate_jwt`` runs both. Every rejection raises ``TokenError`` with a stable code:

==========================  ===============================================================
``malformed_token``         not a compact JWS, bad base64url/JSON, duplicate names, bad header
``token_too_large``         over the token, header or payload size caps
``unsupported_token``       a JWE, a nested JWT (``cty: JWT``) or an unencoded payload
``alg_not_allowed``         ``alg`` is ``none`` or not in the issuer's allow-list
``unsupported_crit``        a ``crit`` header parameter this server does not understand
``unknown_kid``             no key with that ``kid`` (the caller may refresh the key set once)
``missing_kid``             no ``kid`` and more than one key could apply
``key_alg_mismatch``        the ``kid`` names a key of another type than ``alg`` needs
``bad_signature``           the signature does not verify
``wrong_typ``               ``typ`` is not what the issuer's policy requires
``wrong_issuer``            ``iss`` is not the issuer
``wrong_audience``          ``aud`` holds none of the accepted audiences
``expired_token``           ``exp`` is past (beyond leeway)
``token_not_yet_valid``     ``nbf`` is in the future (beyond leeway)
``iat_in_future``           ``iat`` is in the future (beyond leeway)
``missing_claim``           a required claim is absent
``invalid_claim``           a registered claim has the wrong JSON type
``cnf_mismatch``            RFC 8705 binding: no client certificate, or not the bound one
``cnf_required``            the issuer requires sender-constrained tokens and this one is not
``unsupported_cnf``         bound to a proof-of-possession method this server cannot check
                            (``cnf.jkt`` counts only for issuers with ``dpop`` on)
``dpop_required``           the issuer's ``dpop: required`` and this token is not DPoP-bound
==========================  ===============================================================

Headers that point at keys (``jku``, ``x5u``, ``jwk``, ``x5c``) are never used to find one:
keys come only from the issuer's configured set (RFC 8725 §3.10).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import TokenError
from .encoding import b64url_decode, b64url_encode, json_object
from .jose import ALGORITHMS, MAX_KID_LENGTH, Jwk, JwkSet, JwsAlgorithm

DEFAULT_MAX_TOKEN_BYTES = 16 * 1024
DEFAULT_MAX_HEADER_BYTES = 2 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 12 * 1024

# RFC 9068 §2.2: the claims an access token in this profile "MUST" carry.
AT_JWT_REQUIRED = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")
# ``crit`` names this server implements; none (RFC 7515 §4.1.11: reject what is not understood).
UNDERSTOOD_CRIT: frozenset[str] = frozenset()
# RFC 7515 §4.1.11: "Producers MUST NOT include Header Parameter names defined by this
# specification or [JWA] for use with JWS ... in the 'crit' list".
_REGISTERED_HEADER = frozenset({"alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit"})
# When no ``typ`` is configured, these are still accepted; other explicit types (security
# event tokens, logout tokens, DPoP proofs ...) are other kinds of JWT (RFC 8725 §3.11).
_GENERIC_TYPS = frozenset({"jwt", "at+jwt"})


@dataclass(frozen=True, slots=True)
class IssuerPolicy:
    """What one trusted issuer's tokens must satisfy. Built from ``issuers[]`` config."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ("sub", "iat")
    typ: str | None = None  # e.g. "at+jwt" to enforce RFC 9068 explicit typing
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    require_sender_constraint: bool = False
    dpop: str = "off"  # off | allowed | required (RFC 9449: cnf.jkt tokens, checked with a proof)
    _algs: Mapping[str, JwsAlgorithm] = field(init=False, repr=False, compare=False)
    _typ: str | None = field(init=False, repr=False, compare=False)
    _required: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ValueError("issuer must be a non-empty string")
        if not self.audiences or not all(isinstance(a, str) and a for a in self.audiences):
            # RFC 9068 §4: the resource server "MUST validate that the aud claim contains a
            # resource indicator value corresponding to an identifier [it] expects for itself".
            raise ValueError("audiences must list at least one non-empty audience")
        if not self.algorithms:
            raise ValueError("algorithms must list at least one algorithm")
        for name in self.algorithms:
            if name.lower() == "none":
                raise ValueError("'none' is never an allowed algorithm (RFC 8725 §3.2)")
            if name not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
        if self.dpop not in ("off", "allowed", "required"):
            raise ValueError("dpop must be off, allowed or required")
        if not (0 <= self.leeway <= 600):
            raise ValueError("leeway must be between 0 and 600 seconds")
        for cap in ("max_token_bytes", "max_header_bytes", "max_payload_bytes"):
            if not 64 <= getattr(self, cap) <= 1024 * 1024:
                raise ValueError(f"{cap} must be between 64 and 1048576")
        object.__setattr__(self, "_algs", MappingProxyType({n: ALGORITHMS[n] for n in self.algorithms}))
        object.__setattr__(self, "_typ", normalize_typ(self.typ) if self.typ else None)
        required = list(dict.fromkeys(self.required_claims))
        if self._typ == "at+jwt":
            required += [c for c in AT_JWT_REQUIRED if c not in required]
        object.__setattr__(self, "_required", tuple(required))


@dataclass(frozen=True, slots=True)
class VerifiedJws:
    """The result of step 1: a header and payload whose signature verified under ``key``."""

    header: Mapping[str, Any]
    payload: bytes
    algorithm: str
    key: Jwk


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A JWT that passed both steps. ``claims`` and ``header`` are read-only views."""

    issuer: str
    subject: str
    audience: tuple[str, ...]
    claims: Mapping[str, Any]
    header: Mapping[str, Any]
    jti: str | None
    expires_at: float
    not_before: float | None
    issued_at: float | None
    cnf_x5t_s256: str | None
    cnf_jkt: str | None = None  # DPoP-bound: the caller must prove possession of this key (``dpop``)


def _fail(code: str, message: str) -> TokenError:
    return TokenError(message, code=code)


def normalize_typ(value: str) -> str:
    """RFC 7515 §4.1.9: "it is RECOMMENDED that the "application/" prefix be omitted" and media
    types are case-insensitive (RFC 2045 §5.1), so "application/AT+JWT" means "at+jwt"."""
    text = value.strip().lower()
    return text[len("application/"):] if text.startswith("application/") else text


def split_compact(token: object, max_bytes: int) -> list[str]:
    if not isinstance(token, str):
        raise _fail("malformed_token", f"a token is text, got {type(token).__name__}")
    if len(token) > max_bytes:
        raise _fail("token_too_large", f"token of {len(token)} bytes is over the {max_bytes}-byte limit")
    if not token.isascii():
        raise _fail("malformed_token", "token contains non-ASCII characters")
    parts = token.split(".")
    if len(parts) == 5:
        # RFC 7516 §7.1: five parts is a JWE; access tokens here are signed, not encrypted.
        raise _fail("unsupported_token", "encrypted tokens (JWE compact, five segments) are not accepted")
    if len(parts) != 3:
        raise _fail("malformed_token", f"a compact JWS has 3 segments, this token has {len(parts)}")
    return parts


def decode_segment(segment: str, limit: int, what: str) -> dict[str, Any]:
    if len(segment) > (limit * 4 + 2) // 3:
        raise _fail("token_too_large", f"{what} is over the {limit}-byte limit")
    try:
        return json_object(b64url_decode(segment))
    except ValueError as exc:
        raise _fail("malformed_token", f"{what}: {exc}") from None


def peek_issuer(token: str, *, max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
                max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """The unverified ``iss`` claim, only to choose which issuer's keys and policy apply.

    Nothing else may be trusted from it (RFC 8725 §3.8: the issuer's keys, not the token,
    decide). The same size caps and strict decoding apply as in validation.
    """
    _, payload, _ = split_compact(token, max_token_bytes)
    claims = decode_segment(payload, max_payload_bytes, "payload")
    issuer = claims.get("iss")
    if issuer is None:
        raise _fail("missing_claim", "token has no 'iss' claim")
    if not isinstance(issuer, str) or not issuer:
        raise _fail("invalid_claim", "'iss' must be a non-empty string")
    return issuer


def _check_crit(header: Mapping[str, Any]) -> None:
    """RFC 7515 §4.1.11: "If any of the listed extension Header Parameters are not understood
    and supported by the recipient, then the JWS is invalid." The list must be a non-empty
    array of names that are not registered JWS parameters and that appear in the header."""
    crit = header["crit"]
    if not isinstance(crit, list) or not crit or not all(isinstance(n, str) and n for n in crit):
        raise _fail("malformed_token", "'crit' must be a non-empty array of header parameter names")
    for name in crit:
        if name in _REGISTERED_HEADER:
            raise _fail("malformed_token", "'crit' lists a registered parameter")
        if name not in header:
            raise _fail("malformed_token", "'crit' lists a parameter the header does not carry")
        if name not in UNDERSTOOD_CRIT:
            raise _fail("unsupported_crit", "a critical header parameter is not supported")


def _select_key(header: Mapping[str, Any], alg: JwsAlgorithm, keys: JwkSet) -> Jwk:
    kid = header.get("kid")
    if kid is None:
        candidates = keys.fitting(alg)
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise _fail("unknown_kid", f"token has no 'kid' and the issuer has no {alg.name} key")
        raise _fail("missing_kid", f"token has no 'kid' and the issuer has {len(candidates)} {alg.name} keys")
    # RFC 7515 §4.1.4: "The structure of the "kid" value is unspecified. Its value MUST be a
    # case-sensitive string." It is used as a dictionary key and nothing else; kids that no
    # issuer would mint (too long, control characters) are refused before any lookup so they
    # cannot trigger a key-set refresh either.
    if not isinstance(kid, str) or not kid:
        raise _fail("malformed_token", "'kid' must be a non-empty string")
    if len(kid) > MAX_KID_LENGTH or not kid.isprintable():
        raise _fail("malformed_token", f"'kid' of length {len(kid)} with unprintable or excess characters")
    named = keys.with_kid(kid)
    if not named:
        raise _fail("unknown_kid", "no key with the token's kid")
    for jwk in named:
        if jwk.fits(alg):
            return jwk
    # RFC 8725 §2.1 / §3.1: the key decides the algorithm family, never the token.
    raise _fail("key_alg_mismatch", f"the kid names a {named[0].kty} key, which cannot verify {alg.name}")


def verify_jws(token: str, policy: IssuerPolicy, keys: JwkSet) -> VerifiedJws:
    """Step 1: structure, header, key choice, signature (RFC 7515 §5.2).

    The payload is only decoded as base64url here; its JSON is read after the signature
    verifies. Raises ``TokenError``.
    """
    head, body, sig = split_compact(token, policy.max_token_bytes)
    header = decode_segment(head, policy.max_header_bytes, "header")
    if len(body) > (policy.max_payload_bytes * 4 + 2) // 3:
        raise _fail("token_too_large", f"payload is over the {policy.max_payload_bytes}-byte limit")

    name = header.get("alg")
    if not isinstance(name, str):
        # RFC 7515 §4.1.1: "This Header Parameter MUST be present"
        raise _fail("malformed_token", "header has no 'alg' string")
    if name.lower() == "none":
        # RFC 8725 §3.2: "The "none" algorithm should only be used when the JWT is
        # cryptographically protected by other means" -- never the case for a bearer token.
        raise _fail("alg_not_allowed", "unsecured tokens (alg 'none') are never accepted")
    alg = policy._algs.get(name)
    if alg is None:
        # RFC 8725 §3.1: "Libraries MUST enable the caller to specify a supported set of
        # algorithms and MUST NOT use any other algorithms when performing cryptographic operations."
        raise _fail("alg_not_allowed", f"the token's alg is not allowed for {policy.issuer}")
    if "enc" in header:
        raise _fail("unsupported_token", "a JWE header ('enc') is not a signed token")
    cty = header.get("cty")
    if isinstance(cty, str) and normalize_typ(cty) == "jwt":
        # RFC 7519 §5.2: cty "JWT" marks a nested JWT; only one signed layer is accepted.
        raise _fail("unsupported_token", "nested JWTs (cty 'JWT') are not accepted")
    if "crit" in header:
        _check_crit(header)
    if header.get("b64", True) is not True:
        # RFC 7797 §3: an unencoded payload changes what is signed; not accepted.
        raise _fail("unsupported_token", "unencoded payloads ('b64': false) are not accepted")

    key = _select_key(header, alg, keys)
    try:
        signature = b64url_decode(sig)
    except ValueError as exc:
        raise _fail("malformed_token", f"signature: {exc}") from None
    try:
        payload = b64url_decode(body)
    except ValueError as exc:
        raise _fail("malformed_token", f"payload: {exc}") from None
    # RFC 7515 §5.2 step 8: validate over ASCII(BASE64URL(header) || '.' || BASE64URL(payload))
    signing_input = token[: len(head) + 1 + len(body)].encode("ascii")
    if not alg.verify(key.key, signing_input, signature):
        raise _fail("bad_signature", f"{alg.name} signature does not verify")
    return VerifiedJws(MappingProxyType(header), payload, alg.name, key)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 §2 NumericDate: "A JSON numeric value representing the number of seconds from
    1970-01-01T00:00:00Z UTC until the specified UTC date/time, ignoring leap seconds." """
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail("invalid_claim", f"'{name}' must be a NumericDate (a number of seconds)")
    return float(value)


def _string_claim(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise _fail("invalid_claim", f"'{name}' must be a string")
    return value


def _client_thumbprint(value: str | bytes | None) -> str | None:
    """Normalize the certificate hash the shell passes: raw 32-byte digest, 64 hex digits, or
    the RFC 8705 form itself (43 base64url characters); ``""``/``None`` mean "no certificate"."""
    if value is None or value in ("", b""):
        return None
    if isinstance(value, bytes) and len(value) == 32:
        return b64url_encode(value)
    if isinstance(value, str):
        if len(value) == 64:
            try:
                return b64url_encode(bytes.fromhex(value))
            except ValueError:
                pass
        elif len(value) == 43:
            try:
                if len(b64url_decode(value)) == 32:
                    return value
            except ValueError:
                pass
    raise _fail("cnf_mismatch", "the client certificate hash is not a SHA-256 digest")


def cert_thumbprint(cert_der: bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url SHA-256 of the DER certificate, no padding."""
    return b64url_encode(hashlib.sha256(cert_der).digest())


def validate_claims(jws: VerifiedJws, policy: IssuerPolicy, *, now: float,
                    client_cert_sha256: str | bytes | None = None) -> VerifiedToken:
    """Step 2: the claims of a verified token, at ``now`` (Unix seconds), with ``policy.leeway``.

    Raises ``TokenError``; the checks and the sentences they enforce are below.
    """
    try:
        claims = json_object(jws.payload)
    except ValueError as exc:
        # RFC 7519 §7.2 step 10: the message must be a JSON object (the JWT Claims Set).
        raise _fail("malformed_token", f"payload: {exc}") from None
    return check_claims(claims, jws.header, policy, now=now, client_cert_sha256=client_cert_sha256)


def check_claims(claims: dict[str, Any], header: Mapping[str, Any], policy: IssuerPolicy, *, now: float,
                 client_cert_sha256: str | bytes | None = None) -> VerifiedToken:
    """The claim rules of step 2 over a claims set believed to come from the issuer (a verified
    JWT's payload, or an introspection answer)."""
    leeway = policy.leeway
    if policy._typ is not None or "typ" in header:
        typ = header.get("typ")
        if typ is not None and not isinstance(typ, str):
            raise _fail("malformed_token", "'typ' must be a string")
        seen = normalize_typ(typ) if typ else None
        if policy._typ is not None and seen != policy._typ:
            # RFC 9068 §4: "Resource servers MUST verify that the typ header value is
            # "at+jwt" or "application/at+jwt" and reject tokens carrying any other value."
            raise _fail("wrong_typ", f"typ is not {policy.typ!r}")
        if policy._typ is None and seen is not None and seen not in _GENERIC_TYPS:
            # RFC 8725 §3.11: explicit typing keeps one kind of JWT from passing as another.
            raise _fail("wrong_typ", "typ marks another kind of JWT")

    # RFC 7519 §4.1.1 / RFC 9068 §4: "The issuer identifier ... MUST exactly match the value of
    # the iss claim."
    issuer = claims.get("iss")
    if issuer is None:
        raise _fail("missing_claim", "token has no 'iss' claim")
    if not isinstance(issuer, str):
        raise _fail("invalid_claim", "'iss' must be a string")
    if issuer != policy.issuer:
        raise _fail("wrong_issuer", f"iss is not {policy.issuer!r}")

    # RFC 7519 §4.1.4: "The processing of the "exp" claim requires that the current date/time
    # MUST be before the expiration date/time listed in the "exp" claim." Always required here.
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise _fail("missing_claim", "token has no 'exp' claim")
    if now >= exp + leeway:
        raise _fail("expired_token", f"token expired {now - exp:.0f}s ago")
    # RFC 7519 §4.1.5: "the current date/time MUST be after or equal to the not-before
    # date/time listed in the "nbf" claim."
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise _fail("token_not_yet_valid", f"token is not valid for another {nbf - now:.0f}s")
    # RFC 7519 §4.1.6 ("iat" identifies the time at which the JWT was issued): a token cannot
    # have been issued in the future; beyond the leeway that is a forged or broken clock.
    iat = _numeric_date(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise _fail("iat_in_future", f"token claims to be issued {iat - now:.0f}s in the future")

    # RFC 7519 §4.1.3: "If the principal processing the claim does not identify itself with a
    # value in the "aud" claim when this claim is present, then the JWT MUST be rejected."
    # Required here (RFC 9068 §4: the resource server MUST validate it).
    aud = claims.get("aud")
    if aud is None:
        raise _fail("missing_claim", "token has no 'aud' claim")
    audience = (aud,) if isinstance(aud, str) else aud
    if not isinstance(audience, (list, tuple)) or not all(isinstance(a, str) for a in audience):
        raise _fail("invalid_claim", "'aud' must be a string or an array of strings")
    if not any(a in policy.audiences for a in audience):
        raise _fail("wrong_audience", f"aud does not include {list(policy.audiences)!r}")

    for name in policy._required:
        if name not in claims:
            raise _fail("missing_claim", f"token has no {name!r} claim")
    subject = _string_claim(claims, "sub")
    jti = _string_claim(claims, "jti")
    for name in ("client_id", "scope"):
        _string_claim(claims, name)

    bound, jkt = check_confirmation(claims, policy, client_cert_sha256)
    return VerifiedToken(
        issuer=issuer, subject=subject or "", audience=tuple(audience), claims=MappingProxyType(claims),
        header=header, jti=jti, expires_at=exp, not_before=nbf, issued_at=iat, cnf_x5t_s256=bound,
        cnf_jkt=jkt,
    )


def check_confirmation(claims: Mapping[str, Any], policy: IssuerPolicy,
                        client_cert_sha256: str | bytes | None) -> tuple[str | None, str | None]:
    """The token's sender constraint: ``(x5t#S256, jkt)``.

    RFC 8705 §3.1: "the resource server MUST obtain the client certificate used for mutual
    TLS and MUST verify that the certificate matches the certificate associated with the
    access token. If they do not match, the resource access attempt MUST be rejected with an
    error." That association is ``cnf`` ``x5t#S256``, checked here. A DPoP binding (RFC 9449
    §6.1, ``cnf`` ``jkt``) is returned for the caller to check against the request's proof;
    it is honoured only for issuers with ``dpop`` on."""
    cnf = claims.get("cnf")
    if cnf is None:
        if policy.dpop == "required":
            raise _fail("dpop_required", "the issuer's tokens must be DPoP-bound (cnf.jkt)")
        if policy.require_sender_constraint:
            raise _fail("cnf_required", "the issuer's tokens must be bound to a client certificate (cnf)")
        return None, None
    if not isinstance(cnf, dict):
        raise _fail("invalid_claim", "'cnf' must be a JSON object")
    bound, jkt = cnf.get("x5t#S256"), cnf.get("jkt")
    if jkt is not None:
        if policy.dpop == "off":
            raise _fail("unsupported_cnf", "token is DPoP-bound (cnf.jkt) and DPoP is off for its issuer")
        if not isinstance(jkt, str) or not jkt:
            raise _fail("invalid_claim", "'cnf.jkt' must be a non-empty string")
    elif policy.dpop == "required":
        raise _fail("dpop_required", "the issuer's tokens must be DPoP-bound (cnf.jkt)")
    if bound is None:
        if jkt is not None:
            return None, jkt
        # Bound to a key by another method ("jwk", "jku" ...): possession cannot be checked
        # here, and a bound token must not be honoured as a bearer token.
        raise _fail("unsupported_cnf", "token is bound by another method than x5t#S256 or jkt, the only ones checked")
    if not isinstance(bound, str):
        raise _fail("invalid_claim", "'cnf.x5t#S256' must be a string")
    presented = _client_thumbprint(client_cert_sha256)
    if presented is None:
        raise _fail("cnf_mismatch", "token is bound to a client certificate, but the call presented none")
    if not hmac.compare_digest(presented.encode(), bound.encode()):
        raise _fail("cnf_mismatch", "token is bound to another client certificate")
    return bound, jkt


def validate_jwt(token: str, policy: IssuerPolicy, keys: JwkSet, *, now: float,
                 client_cert_sha256: str | bytes | None = None) -> VerifiedToken:
    """Both steps: ``verify_jws`` (signature) then ``validate_claims`` (claims at ``now``)."""
    return validate_claims(verify_jws(token, policy, keys), policy, now=now, client_cert_sha256=client_cert_sha256)
