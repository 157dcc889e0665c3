"""Signed bundles: ``.signatures.json`` verified and made as OPA does.

The file holds ``{"signatures": [JWT]}``, exactly one compact JWS. Its payload lists every
file of the bundle with a digest (``{"files": [{"name", "hash", "algorithm"}], "scope",
"keyid", "iat", "iss"}``). Verification follows OPA's ``bundle/verify.go`` step by step:

1. the key id is the bundle's ``signing.keyid`` if configured, else the JWT header's ``kid``,
   else the payload's deprecated ``keyid`` claim; none is an error;
2. the key and its algorithm come from ``keys.<id>``; the JWS is verified with *that*
   algorithm (the header's ``alg`` is never consulted, so it cannot choose a weaker one);
3. the payload's ``scope`` must equal the configured ``signing.scope`` (or the key's);
4. every file in the bundle but ``.signatures.json`` and the ``exclude_files`` patterns must be
   listed with a matching digest (see ``hashing``), and every listed file must be present.

pyjwt's algorithm objects do the signature arithmetic; the key parsing (PEM blocks OPA
accepts: ``PUBLIC KEY``, ``RSA PUBLIC KEY``, ``CERTIFICATE`` and private keys) is written
here because OPA takes the algorithm from configuration, not from the token, which pyjwt's
``decode`` does not offer. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidKeyError

from .errors import BundleError
from .hashing import DEFAULT_HASH, HASHES, file_digest

SIGNATURES_FILE = ".signatures.json"
SUPPORTED_ALGORITHMS = ("ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "PS256", "PS384", "PS512",
                        "RS256", "RS384", "RS512")  # OPA's keys.supportedAlgos
DEFAULT_ALGORITHM = "RS256"
_HMAC = ("HS256", "HS384", "HS512")


@dataclass(frozen=True)
class KeyConfig:
    """``keys.<id>``: ``key`` is a PEM public key (or certificate), or the HMAC secret."""

    key: str = ""
    algorithm: str = DEFAULT_ALGORITHM
    scope: str = ""
    private_key: str = ""


@dataclass(frozen=True)
class VerificationConfig:
    """A bundle's ``signing`` section, with the configured ``keys``."""

    keys: Mapping[str, KeyConfig] = field(default_factory=dict)
    keyid: str = ""
    scope: str = ""
    exclude_files: tuple[str, ...] = ()
    required: bool = False  # a bundle without .signatures.json is refused


@dataclass(frozen=True)
class FileInfo:
    name: str
    hash: str
    algorithm: str = DEFAULT_HASH

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.hash, "algorithm": self.algorithm}


@dataclass(frozen=True)
class DecodedSignature:
    files: tuple[FileInfo, ...]
    keyid: str = ""
    scope: str = ""
    iat: int = 0
    iss: str = ""


# -- verification

def parse_signatures_file(raw: bytes) -> list[str]:
    """``.signatures.json`` → its JWTs (any number: the count is checked by ``verify_signatures``)."""
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"bundle load failed on signatures decode: {exc}", code="bundle_signature_invalid") from None
    if not isinstance(document, dict):
        raise BundleError("bundle load failed on signatures decode: not an object", code="bundle_signature_invalid")
    tokens = document.get("signatures") or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise BundleError("bundle load failed on signatures decode: signatures must be a list of strings",
                          code="bundle_signature_invalid")
    if document.get("plugin"):
        raise BundleError(f"signature plugin {document['plugin']!r} is not supported", code="bundle_signature_invalid")
    return tokens


def verify_signatures(tokens: list[str], config: VerificationConfig) -> dict[str, FileInfo]:
    """OPA's ``DefaultVerifier``: exactly one JWT, verified; returns the files it lists by name."""
    if not tokens:
        raise BundleError(".signatures.json: missing JWT (expected exactly one)", code="bundle_signature_invalid")
    if len(tokens) > 1:
        raise BundleError(".signatures.json: multiple JWTs not supported (expected exactly one)",
                          code="bundle_signature_invalid")
    decoded = verify_jwt(tokens[0], config)
    return {info.name: info for info in decoded.files}


def verify_jwt(token: str, config: VerificationConfig) -> DecodedSignature:
    parts = token.split(".")
    if len(parts) != 3:
        raise BundleError("failed to split compact JWT: invalid number of segments", code="bundle_signature_invalid")
    header_b64, payload_b64, signature_b64 = parts
    keyid = config.keyid
    if not keyid:
        header = _json_segment(header_b64, "failed to extract key ID from headers")
        kid = header.get("kid") if isinstance(header, dict) else None
        if kid is not None and not isinstance(kid, str):
            raise BundleError("failed to extract key ID from headers: kid is not a string",
                              code="bundle_signature_invalid")
        keyid = kid or ""
    decoded = _decode_payload(_json_segment(payload_b64, "failed to decode JWT payload"))
    keyid = keyid or decoded.keyid
    if not keyid:
        raise BundleError("verification key ID is empty", code="bundle_key_unknown")
    key_config = config.keys.get(keyid)
    if key_config is None:
        raise BundleError(f"verification key corresponding to ID {keyid} not found", code="bundle_key_unknown")
    algorithm = _algorithm(key_config.algorithm)
    key = _verification_key(key_config, algorithm)
    try:
        signature = _b64decode(signature_b64)
    except ValueError as exc:
        raise BundleError(f"failed to base64 decode JWT signature: {exc}", code="bundle_signature_invalid") from None
    try:
        verified = algorithm.verify(f"{header_b64}.{payload_b64}".encode("ascii", "replace"), key, signature)
    except (TypeError, ValueError, AttributeError, InvalidKeyError):  # a key of another family than the algorithm
        raise BundleError(f"the key for ID {keyid} cannot verify {key_config.algorithm}", code="bundle_key_invalid") \
            from None
    if not verified:
        raise BundleError("failed to verify JWT signature", code="bundle_signature_invalid")
    scope = config.scope or key_config.scope
    if decoded.scope != scope:
        raise BundleError("scope mismatch", code="bundle_scope_mismatch")
    return decoded


def verify_files(files: Iterable[tuple[str, bytes]], signed: dict[str, FileInfo], config: VerificationConfig) -> None:
    """Every file (but the signatures file) signed with a matching digest, and nothing signed
    that is missing. ``signed`` is consumed."""
    remaining = dict(signed)
    for path, raw in files:
        name = path.lstrip("/")
        if is_excluded(name, config.exclude_files):
            remaining.pop(name, None)
            continue
        verify_file(name, raw, remaining)
    if remaining:
        raise BundleError(f"file(s) {sorted(remaining)} specified in bundle signatures but not found in the target "
                          "bundle", code="bundle_file_missing")


def verify_file(name: str, raw: bytes, signed: dict[str, FileInfo]) -> None:
    """OPA's ``VerifyBundleFile``: removes ``name`` from ``signed`` once it verifies."""
    info = signed.get(name)
    if info is None:
        raise BundleError(f"file {name} not included in bundle signature", code="bundle_file_not_signed")
    if not info.algorithm:
        raise BundleError(f"no hashing algorithm provided for file {name}", code="bundle_digest_mismatch")
    if info.algorithm not in HASHES:
        raise BundleError(f"unsupported hashing algorithm: {info.algorithm}", code="bundle_digest_mismatch")
    actual = file_digest(name, raw, info.algorithm)
    try:
        expected = bytes.fromhex(info.hash).hex()
    except ValueError:
        raise BundleError(f"{name}: digest {info.hash!r} is not hex", code="bundle_digest_mismatch") from None
    if expected != actual:
        raise BundleError(f"{name}: digest mismatch (want: {expected}, got: {actual})", code="bundle_digest_mismatch")
    del signed[name]


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    """Go's ``filepath.Match``: ``*`` and ``?`` never cross a ``/``."""
    return any(_go_match(pattern, name) for pattern in patterns)


def _go_match(pattern: str, name: str) -> bool:
    pattern_parts, name_parts = pattern.split("/"), name.split("/")
    if len(pattern_parts) != len(name_parts):
        return False
    return all(fnmatch.fnmatchcase(n, p) for p, n in zip(pattern_parts, name_parts))


def _b64decode(segment: str) -> bytes:
    if "=" in segment:
        raise ValueError("illegal padding")
    try:
        return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"illegal base64 data: {exc}") from None


def _json_segment(segment: str, context: str) -> Any:
    try:
        raw = _b64decode(segment)
    except ValueError as exc:
        raise BundleError(f"{context}: {exc}", code="bundle_signature_invalid") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{context}: cannot parse JSON: {exc}", code="bundle_signature_invalid") from None


def _decode_payload(payload: Any) -> DecodedSignature:
    """Read as Go reads JSON into ``DecodedSignature``: unknown members ignored, a member of the
    wrong type an error."""
    if payload is None:
        return DecodedSignature(files=())
    if not isinstance(payload, dict):
        raise BundleError("JWT payload is not an object", code="bundle_signature_invalid")

    def text(value: Any, what: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise BundleError(f"JWT payload: {what} must be a string", code="bundle_signature_invalid")
        return value

    raw_files = payload.get("files")
    if raw_files is None:
        raw_files = []
    if not isinstance(raw_files, list):
        raise BundleError("json: cannot unmarshal object into Go struct field DecodedSignature.files of type "
                          "[]bundle.FileInfo", code="bundle_signature_invalid")
    files = []
    for index, item in enumerate(raw_files):
        if not isinstance(item, dict):
            raise BundleError(f"JWT payload: files[{index}] must be an object", code="bundle_signature_invalid")
        files.append(FileInfo(text(item.get("name"), f"files[{index}].name"),
                              text(item.get("hash"), f"files[{index}].hash"),
                              text(item.get("algorithm"), f"files[{index}].algorithm")))
    iat = payload.get("iat", 0)
    if iat is None:
        iat = 0
    if isinstance(iat, bool) or not isinstance(iat, int):
        raise BundleError("JWT payload: iat must be an integer", code="bundle_signature_invalid")
    return DecodedSignature(files=tuple(files), keyid=text(payload.get("keyid"), "keyid"),
                            scope=text(payload.get("scope"), "scope"), iat=iat, iss=text(payload.get("iss"), "iss"))


def _algorithm(name: str) -> Any:
    algorithm = get_default_algorithms().get(name) if name in SUPPORTED_ALGORITHMS else None
    if algorithm is None:
        raise BundleError(f"unknown signature algorithm: {name}", code="bundle_key_invalid")
    return algorithm


def _verification_key(config: KeyConfig, algorithm: Any) -> Any:
    if config.algorithm in _HMAC:
        return config.key.encode("utf-8")
    return load_public_key(config.key)


def load_public_key(text: str) -> Any:
    """A public key from the first PEM block OPA accepts; private keys and certificates give
    theirs."""
    data = text.encode("utf-8")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        if b"PRIVATE KEY-----" in data:
            return serialization.load_pem_private_key(data, password=None).public_key()
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise BundleError("failed to parse PEM block containing the key", code="bundle_key_invalid") from None


# -- signing (authz-server bundle sign / build --signing-key)

def sign_files(files: Iterable[tuple[str, bytes]], *, key: str, algorithm: str = DEFAULT_ALGORITHM,
               keyid: str = "", claims: Mapping[str, Any] | None = None) -> str:
    """The JWT ``opa sign`` would write for ``files`` (path, bytes): SHA-256 digests, the
    claims file's claims (or the deprecated ``keyid`` claim when a key id is given without
    one), ``kid`` in the header when a key id is given."""
    infos = [FileInfo(path.lstrip("/"), file_digest(path, raw)).to_json() for path, raw in files
             if path.lstrip("/") != SIGNATURES_FILE]
    payload: dict[str, Any] = {"files": infos}
    if claims:
        payload.update(claims)
    elif keyid:
        payload["keyid"] = keyid
    return sign_payload(payload, key=key, algorithm=algorithm, keyid=keyid)


def sign_payload(payload: Mapping[str, Any], *, key: str, algorithm: str, keyid: str = "") -> str:
    signer = _algorithm(algorithm)
    try:
        if algorithm in _HMAC:
            signing_key: Any = key.encode("utf-8")
        else:
            signing_key = serialization.load_pem_private_key(key.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        raise BundleError("failed to parse PEM block containing the private key", code="bundle_key_invalid") from None
    header = {"alg": algorithm, "typ": "JWT", **({"kid": keyid} if keyid else {})}
    header_b64 = _b64encode(json.dumps(header, separators=(",", ":")).encode())
    payload_b64 = _b64encode(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{header_b64}.{payload_b64}".encode()
    try:
        signature = signer.sign(signing_input, signing_key)
    except (InvalidKeyError, TypeError, ValueError) as exc:
        raise BundleError(f"cannot sign with this key and {algorithm}: {exc}", code="bundle_key_invalid") from None
    return f"{header_b64}.{payload_b64}.{_b64encode(signature)}"


def signatures_document(token: str) -> bytes:
    return json.dumps({"signatures": [token]}, indent=1).encode() + b"\n"


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
