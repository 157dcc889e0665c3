"""OPA's bundle file digests: what ``.signatures.json`` signs for each file.

From OPA's ``bundle/hash.go`` and ``bundle/verify.go``: a structured file (one whose base
name is ``data.json``, ``data.yaml``, ``.manifest`` or ``signatures.json``) is parsed and
hashed in a canonical form, "independent of whitespace and other non-semantic JSON
features"; every other file is hashed as its bytes. The canonical form writes an object as
``{``, its keys in sorted order each as ``"key":`` followed by its value, separated by ``,``,
then ``}``; an array as ``[`` values ``]``; anything else as Go's ``encoding/json`` writes it
with HTML escaping off. Numbers in JSON files keep their literal text (OPA reads them as
``json.Number``). Note that ``data.yml`` is not a structured file for OPA: it is hashed raw.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from decimal import Decimal
from typing import Any, Callable

import yaml

from .errors import BundleError

# OPA's HashingAlgorithm names → hashlib constructors.
HASHES: dict[str, Callable[[], Any]] = {
    "MD5": hashlib.md5,
    "SHA-1": hashlib.sha1,
    "SHA-224": hashlib.sha224,
    "SHA-256": hashlib.sha256,
    "SHA-384": hashlib.sha384,
    "SHA-512": hashlib.sha512,
    "SHA-512-224": lambda: hashlib.new("sha512_224"),
    "SHA-512-256": lambda: hashlib.new("sha512_256"),
}
DEFAULT_HASH = "SHA-256"
STRUCTURED = ("data.json", "data.yaml", "signatures.json", ".manifest")


class JsonNumber(str):
    """A JSON number kept as the text it was written with (Go's ``json.Number``)."""


def is_structured(name: str) -> bool:
    return posixpath.basename(name) in STRUCTURED


def parse_json_keeping_numbers(raw: bytes) -> Any:
    """JSON with numbers kept as ``JsonNumber``; raises ``ValueError``."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(raw, parse_int=JsonNumber, parse_float=JsonNumber, parse_constant=refuse)


def structured_value(name: str, raw: bytes) -> Any:
    """The parsed document OPA hashes for a structured file; ``BundleError`` if it does not parse."""
    try:
        if posixpath.basename(name) == "data.yaml":
            return yaml.safe_load(raw.decode("utf-8"))
        return parse_json_keeping_numbers(raw)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BundleError(f"{name}: cannot parse: {str(exc).splitlines()[0] if str(exc) else exc}",
                          code="bundle_invalid") from None


def file_digest(name: str, raw: bytes, algorithm: str = DEFAULT_HASH) -> str:
    """Hex digest of a bundle file as OPA computes it (``name`` decides structured or raw)."""
    try:
        hasher = HASHES[algorithm]()
    except KeyError:
        raise BundleError(f"unsupported hashing algorithm: {algorithm}", code="bundle_signature_invalid") from None
    if is_structured(name):
        hasher.update(canonical_bytes(structured_value(name, raw)))
    else:
        hasher.update(raw)
    return hasher.hexdigest()


def canonical_bytes(value: Any) -> bytes:
    parts: list[str] = []
    _walk(value, parts.append)
    return "".join(parts).encode("utf-8")


def _walk(value: Any, write: Callable[[str], None]) -> None:
    if isinstance(value, dict):
        write("{")
        for index, key in enumerate(sorted(value, key=str)):
            if index:
                write(",")
            write(_string(str(key)))
            write(":")
            _walk(value[key], write)
        write("}")
    elif isinstance(value, (list, tuple)):
        write("[")
        for index, item in enumerate(value):
            if index:
                write(",")
            _walk(item, write)
        write("]")
    else:
        write(_primitive(value))


def _primitive(value: Any) -> str:
    if isinstance(value, JsonNumber):
        return str.__str__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return _string(value)
    # YAML may give dates and the like: Go's YAML-to-JSON step turns them into strings.
    return _string(str(value))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _string(text: str) -> str:
    """Go's ``encoding/json`` with ``SetEscapeHTML(false)``: ``"`` ``\\`` and control characters
    escaped (``\\b \\f \\n \\r \\t`` short, the rest ``\\u00xx``), U+2028/U+2029 escaped, other
    characters as UTF-8, invalid code points as U+FFFD."""
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return json.dumps(text, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def go_float(value: float) -> str:
    """A float64 as Go's ``encoding/json`` writes it: the shortest digits that read back, in
    plain notation for 1e-6 <= |x| < 1e21, else exponent notation like ``1e-07`` → ``1e-7``."""
    if not math.isfinite(value):
        raise BundleError(f"{value!r} cannot be written as JSON", code="bundle_invalid")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    shortest = repr(value)
    magnitude = abs(value)
    if 1e-6 <= magnitude < 1e21:
        text = format(Decimal(shortest), "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    mantissa, _, exponent = format(Decimal(shortest), "e").partition("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    sign = "-" if exponent.startswith("-") else "+"
    return f"{mantissa}e{sign}{exponent.lstrip('+-').lstrip('0') or '0'}"
