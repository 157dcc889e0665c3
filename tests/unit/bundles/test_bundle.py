"""Bundles in and out of tarballs, OPA's manifest and roots rules, signed bundles end to end."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authz_server.bundles.archive import read_tarball, write_tarball
from authz_server.bundles.bundle import bundle_from_files, load_bundle, merge, package_path, roots_overlap
from authz_server.bundles.errors import BundleError
from authz_server.bundles.signing import (SIGNATURES_FILE, KeyConfig, VerificationConfig, sign_files,
                                          signatures_document)

POLICY = b"package envoy.authz\n\nimport rego.v1\n\ndefault allow := false\n"


def _files(*extra: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    return [(".manifest", json.dumps({"revision": "r1", "roots": ["envoy"]}).encode()),
            ("envoy/authz/policy.rego", POLICY), ("envoy/authz/data.json", b'{"admins": ["alice"]}'), *extra]


def _pem(key: object) -> tuple[str, str]:
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def test_a_tarball_round_trips_byte_for_byte() -> None:
    raw = write_tarball(_files())
    assert raw == write_tarball(list(reversed(_files())))  # same files, same bytes, same ETag
    assert sorted(read_tarball(raw)) == sorted(_files())
    bundle = load_bundle("authz", raw)
    assert bundle.revision == "r1" and bundle.data == {"envoy": {"authz": {"admins": ["alice"]}}}


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "empty", "link", "dotdot"])
def test_a_damaged_tarball_is_refused_as_unreadable(damage: str) -> None:
    raw = write_tarball(_files())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "not gzip":
        raw = b"<html>502 Bad Gateway</html>"
    elif damage == "empty":
        raw = write_tarball([])
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            info = tarfile.TarInfo("/envoy/authz/policy.rego" if damage == "link" else "/../escape.rego")
            if damage == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(POLICY)
            archive.addfile(info, io.BytesIO(POLICY) if damage == "dotdot" else None)
        raw = buffer.getvalue()
    with pytest.raises(BundleError) as raised:
        load_bundle("authz", raw)
    assert raised.value.code == "bundle_unreadable"


def test_a_file_over_the_size_limit_is_refused() -> None:
    raw = write_tarball(_files(("envoy/authz/big/data.json", b'{"x": "' + b"a" * 5000 + b'"}')))
    with pytest.raises(BundleError, match="exceeds the limit|more than"):
        load_bundle("authz", raw, size_limit=1000)


def test_roots_bound_modules_and_data() -> None:
    with pytest.raises(BundleError, match="do not permit 'data.other.p'"):
        bundle_from_files("b", _files(("other/p/policy.rego", b"package other.p\n")))
    with pytest.raises(BundleError, match="do not permit data at path '/other'"):
        bundle_from_files("b", _files(("other/data.json", b'{"x": 1}')))
    with pytest.raises(BundleError, match="overlapped roots"):
        bundle_from_files("b", [(".manifest", b'{"roots": ["a", "a/b"]}'), ("a/p.rego", b"package a\n")])


def test_data_below_the_root_may_be_any_json_value() -> None:
    bundle = bundle_from_files("b", [("a/b/c/data.json", b"[1,2,3]"), ("a/p.rego", b"package a\n"),
                                     ("a/b/d/data.yaml", b"foo: 1\n")])
    assert bundle.data == {"a": {"b": {"c": [1, 2, 3], "d": {"foo": 1}}}}


@pytest.mark.parametrize("name", ["patch.json", "policy.wasm", "plan.json"])
def test_what_we_cannot_serve_is_refused_not_skipped(name: str) -> None:
    with pytest.raises(BundleError, match="not supported"):
        bundle_from_files("b", _files((name, b"{}")))


def test_package_paths() -> None:
    assert package_path("# c\npackage a.b[\"c-d\"].e # trailing\n", "x") == ["a", "b", "c-d", "e"]
    with pytest.raises(BundleError):
        package_path("allow := true\n", "x.rego")


def test_roots_overlap_segment_by_segment() -> None:
    assert roots_overlap("", "a") and roots_overlap("a", "a/b") and roots_overlap("a/b", "a")
    assert not roots_overlap("a/b", "a/bc") and not roots_overlap("x", "y")


def test_bundles_merge_under_their_names_and_overlapping_roots_are_refused() -> None:
    first = bundle_from_files("authz", _files())
    second = bundle_from_files("lists", [(".manifest", b'{"revision": "7", "roots": ["lists"]}'),
                                         ("lists/data.json", b'{"blocked": ["mallory"]}')])
    policy_set = merge([first, second])
    assert set(policy_set.modules) == {"authz/envoy/authz/policy.rego"}
    assert policy_set.data == {"envoy": {"authz": {"admins": ["alice"]}}, "lists": {"blocked": ["mallory"]}}
    assert policy_set.revision == "authz=r1,lists=7" and policy_set.version == merge([second, first]).version
    clash = bundle_from_files("clash", [(".manifest", b'{"roots": ["envoy/authz/x"]}'),
                                        ("envoy/authz/x/data.json", b"{}")])
    with pytest.raises(BundleError) as raised:
        merge([first, clash])
    assert raised.value.code == "bundle_roots_overlap"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "PS384", "HS256"])
def test_a_signed_bundle_verifies_and_any_tampering_is_refused(algorithm: str) -> None:
    if algorithm == "HS256":
        private = public = "a shared secret for the bundle service"
    else:
        key = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private, public = _pem(key)
    files = _files()
    token = sign_files(files, key=private, algorithm=algorithm, keyid="global", claims={"scope": "write"})
    signed = files + [(SIGNATURES_FILE, signatures_document(token))]
    verification = VerificationConfig(keys={"global": KeyConfig(key=public, algorithm=algorithm)}, scope="write",
                                      required=True)
    assert bundle_from_files("b", signed, verification=verification).signed

    def refused(bundle_files: list[tuple[str, bytes]], config: VerificationConfig = verification) -> str:
        with pytest.raises(BundleError) as raised:
            bundle_from_files("b", bundle_files, verification=config)
        return raised.value.code

    tampered = [(p, POLICY.replace(b"false", b"true") if p.endswith(".rego") else r) for p, r in signed]
    assert refused(tampered) == "bundle_digest_mismatch"
    assert refused(signed + [("envoy/authz/extra.rego", b"package envoy.authz\n")]) == "bundle_file_not_signed"
    assert refused([f for f in signed if not f[0].endswith("data.json")]) == "bundle_file_missing"
    assert refused(files) == "bundle_unsigned"
    other = VerificationConfig(keys={"global": KeyConfig(key=_pem(rsa.generate_private_key(
        public_exponent=65537, key_size=2048))[1], algorithm="RS256")}, required=True) if algorithm != "RS256" else \
        VerificationConfig(keys={"global": KeyConfig(key=_pem(rsa.generate_private_key(
            public_exponent=65537, key_size=2048))[1], algorithm="RS256")}, scope="write", required=True)
    assert refused(signed, other) in ("bundle_signature_invalid", "bundle_key_invalid", "bundle_scope_mismatch")
    assert refused(signed, VerificationConfig(keys=verification.keys, scope="read", required=True)) == \
        "bundle_scope_mismatch"


def test_excluded_files_need_no_signature() -> None:
    secret = "s3cret-s3cret-s3cret-s3cret-s3cret"
    files = _files()
    token = sign_files(files, key=secret, algorithm="HS256", keyid="k")
    extra = ("notes/README.md", b"not signed")
    config = VerificationConfig(keys={"k": KeyConfig(key=secret, algorithm="HS256")}, exclude_files=("notes/*",),
                                required=True)
    bundle_from_files("b", files + [extra, (SIGNATURES_FILE, signatures_document(token))], verification=config)


def test_without_signing_configured_a_signed_bundle_still_verifies_and_an_unsigned_one_passes() -> None:
    """OPA's rule: keys alone verify a signed bundle; only signing: makes a signature required."""
    secret = "s3cret-s3cret-s3cret-s3cret-s3cret"
    keys = {"k": KeyConfig(key=secret, algorithm="HS256")}
    bundle_from_files("b", _files(), verification=VerificationConfig(keys=keys))
    bad = sign_files(_files(), key="another secret entirely, 32 bytes+", algorithm="HS256", keyid="k")
    with pytest.raises(BundleError):
        bundle_from_files("b", _files() + [(SIGNATURES_FILE, signatures_document(bad))],
                          verification=VerificationConfig(keys=keys))
    with pytest.raises(BundleError) as raised:
        bundle_from_files("b", _files() + [(SIGNATURES_FILE, signatures_document(bad))])
    assert raised.value.code == "bundle_key_unknown"
