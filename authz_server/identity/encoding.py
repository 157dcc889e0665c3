"""The two encodings every JOSE object is made of, read strictly: base64url and JSON.

Strict means one spelling per value. A decoder that accepts several spellings of the same
bytes (padding, the standard alphabet, stray bits in the last character, whitespace) or
several readings of the same text (duplicate member names) lets two parties disagree about
what a token says (RFC 8725 §2.6, "Multiplicity of JSON Encodings"), so they are refused.

Errors are ``ValueError`` with a message quoting what was wrong; callers turn them into
their own error codes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Mapping

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_VALUE = {c: i for i, c in enumerate(_ALPHABET)}
_ALLOWED = frozenset(_ALPHABET)


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2, "Base64url Encoding")."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url as RFC 7515 §2 defines it, and nothing looser.

    RFC 7515 §2: "Base64 encoding using the URL- and filename-safe character set defined in
    Section 5 of RFC 4648, with all trailing '=' characters omitted ... and without the
    inclusion of any line breaks, whitespace, or other additional characters."
    The unused low bits of the last character must be zero (RFC 4648 §3.5), so every byte
    string has exactly one encoding.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected base64url text, got {type(text).__name__}")
    if not _ALLOWED.issuperset(text):
        raise ValueError("a character is not in the base64url alphabet")
    rest = len(text) % 4
    if rest == 1:
        raise ValueError(f"base64url text of length {len(text)} cannot be decoded")
    if rest:
        last = _VALUE[text[-1]]
        if last & (0x0F if rest == 2 else 0x03):
            raise ValueError("base64url text has non-zero trailing bits (not the canonical encoding)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:  # unreachable after the checks above; kept as a guard
        raise ValueError(f"not base64url: {exc}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError("a member name appears twice")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number is out of the range of a double")
    return value


# I-JSON (RFC 7493 §2.2): numbers should not be more precise or larger than what an IEEE 754
# double or a 64-bit integer holds. A larger integer (10**400 as a token's "exp") makes
# arithmetic fail later, far from where it came in; it is refused here, with the rest.
_INT_DIGITS = 20  # 2**64 has 20 digits


def _int64(text: str) -> int:
    if len(text) > _INT_DIGITS + 1:  # before int(): Python's own limit is 4300 digits
        raise ValueError("an integer is out of the 64-bit range")
    value = int(text)
    if not -(2**63) <= value < 2**64:  # signed or unsigned 64 bits (SPIFFE's spiffe_sequence is uint64)
        raise ValueError("an integer is out of the 64-bit range")
    return value


def json_object(data: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON text that must be an object, refusing duplicate member names.

    RFC 7515 §4: "The Header Parameter names within the JOSE Header MUST be unique; JWS
    parsers MUST either reject JWSs with duplicate Header Parameter names or use a JSON parser
    that returns only the lexically last duplicate member name"; RFC 7519 §4 says the same of
    claim names. Taking the last one is exactly where two parsers disagree (RFC 8725 §2.6), so
    duplicates are rejected, at every nesting level. ``NaN`` and ``Infinity`` are not JSON
    (RFC 8259 §6) and are rejected too, as are integers beyond 64 bits (``_int64``); RFC 8725
    §3.7: "UTF-8 MUST be used".
    """
    try:
        text = data.decode("utf-8")  # RFC 8259 §8.1: UTF-8; json.loads(bytes) would guess UTF-16/32
    except UnicodeDecodeError:
        raise ValueError("JSON text is not UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                           parse_float=_finite_float, parse_int=_int64)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got a JSON {type(value).__name__}")
    return value


def json_compact(value: Any) -> bytes:
    """Compact UTF-8 JSON, as producers put it in a token."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def jwk_set_document(document: bytes | str | Mapping[str, Any]) -> tuple[Mapping[str, Any], list[Any]]:
    """A JWK-Set-shaped document (RFC 7517 §5; SPIFFE bundles share the shape) and its ``keys``
    array; ``ValueError`` says what is wrong, for the caller to name the document."""
    if isinstance(document, (bytes, str)):
        data: Mapping[str, Any] = json_object(document.encode() if isinstance(document, str) else document)
    else:
        data = document
    keys = data.get("keys") if isinstance(data, Mapping) else None
    if not isinstance(keys, list):
        raise ValueError("no 'keys' array")
    return data, keys
