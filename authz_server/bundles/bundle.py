"""One OPA bundle, checked, and several bundles merged into the ``PolicySet`` that serves.

A bundle's files follow OPA's layout: ``.rego`` modules, ``data.json``/``data.yaml``/``data.yml``
laid at their folder's path (``a/b/data.json`` is ``data.a.b``), one ``.manifest`` (``revision``,
``roots``, ``metadata``) and, when signed, ``.signatures.json``. Our policy-test case files
(``*_test.yaml``) ride along as they do in a policy folder. A bundle is refused when it holds
what we cannot serve (a delta ``patch.json``, ``policy.wasm``, ``plan.json``, a protobuf manifest)
rather than served without it.

OPA's manifest rules apply: roots do not overlap one another; every module's package and
every data path lies under a root; and the bundles that serve together have disjoint roots,
so none can replace another's policy or data (OPA's ``validateAndInjectDefaults`` and its
multi-bundle activation).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ..errors import PolicyError
from ..policy.source import DATA_FILES, TEST_CASE_SUFFIXES, CacheSettings, PolicySet, cache_settings, merge_at, \
    parse_document
from .archive import DEFAULT_SIZE_LIMIT, read_tarball
from .errors import BundleError
from .signing import SIGNATURES_FILE, VerificationConfig, parse_signatures_file, verify_files, verify_signatures

MANIFEST = ".manifest"
UNSUPPORTED = {"patch.json": "delta bundles", "policy.wasm": "Wasm modules", "plan.json": "plans",
               "plan.pb": "plans", ".manifest.pb": "protobuf manifests"}


@dataclass(frozen=True)
class Manifest:
    revision: str = ""
    roots: tuple[str, ...] = ("",)
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    """A verified, checked bundle. ``raw`` is the tarball it came in (what ``persist`` keeps)."""

    name: str
    manifest: Manifest
    modules: Mapping[str, str]
    data: Mapping[str, Any]
    test_cases: Mapping[str, Any]
    digest: str  # over every file: equal bundles, equal digests
    raw: bytes = b""
    etag: str = ""
    signed: bool = False

    @property
    def revision(self) -> str:
        return self.manifest.revision


def load_bundle(name: str, raw: bytes, *, verification: VerificationConfig | None = None,
                size_limit: int = DEFAULT_SIZE_LIMIT, etag: str = "") -> Bundle:
    """Read, verify and check a ``.tar.gz`` bundle; ``BundleError`` (or ``PolicyError`` for a file
    that does not parse) names what is wrong."""
    bundle = bundle_from_files(name, read_tarball(raw, size_limit=size_limit), verification=verification)
    return Bundle(bundle.name, bundle.manifest, bundle.modules, bundle.data, bundle.test_cases, bundle.digest,
                  raw=raw, etag=etag, signed=bundle.signed)


def bundle_from_files(name: str, files: Sequence[tuple[str, bytes]], *,
                      verification: VerificationConfig | None = None) -> Bundle:
    signatures = [raw for path, raw in files if path == SIGNATURES_FILE]
    content = [(path, raw) for path, raw in files if path != SIGNATURES_FILE]
    _check_signatures(signatures[0] if signatures else None, content, verification)
    manifest = Manifest()
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    cases: dict[str, Any] = {}
    raw_manifest: Mapping[str, Any] = {}
    for path, raw in content:
        base = posixpath.basename(path)
        if base in UNSUPPORTED:
            raise BundleError(f"{path}: {UNSUPPORTED[base]} are not supported", code="bundle_invalid")
        if path == MANIFEST:
            raw_manifest = parse_document(_text(raw, path), path)
            manifest = _manifest(raw_manifest)
        elif path.endswith(".rego"):
            modules[path] = _text(raw, path)
        elif base in DATA_FILES:
            _lay_data(data, path, raw)
        elif path.endswith(TEST_CASE_SUFFIXES):
            cases[path] = parse_document(_text(raw, path), path)
        # other files are carried (and verified) but not used, as OPA does
    _check_roots(manifest, modules, data)
    cache_settings(raw_manifest)  # a bad decision_cache section fails here, not at activation
    digest = hashlib.sha256()
    for path, raw in sorted(content):
        digest.update(path.encode() + b"\0" + hashlib.sha256(raw).digest())
    return Bundle(name, manifest, modules, data, cases, digest.hexdigest(), signed=bool(signatures))


def _check_signatures(signatures: bytes | None, files: Sequence[tuple[str, bytes]],
                      verification: VerificationConfig | None) -> None:
    if signatures is None:
        if verification is not None and (verification.required or verification.keyid):
            raise BundleError("bundle missing .signatures.json file", code="bundle_unsigned")
        return
    if verification is None:
        raise BundleError("the bundle is signed but no verification key is configured", code="bundle_key_unknown")
    signed = verify_signatures(parse_signatures_file(signatures), verification)
    verify_files(files, signed, verification)


def _text(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not UTF-8", code="bundle_invalid") from None


def _lay_data(data: dict[str, Any], path: str, raw: bytes) -> None:
    """``a/b/data.json`` at ``data.a.b``; below the root a data file may hold any JSON value."""
    folder = posixpath.dirname(path)
    parts = folder.split("/") if folder else []
    text = _text(raw, path)
    try:
        value = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise BundleError(f"{path}: cannot parse: {str(exc).splitlines()[0]}", code="bundle_invalid") from None
    if isinstance(value, dict):
        merge_at(data, parts, value, path)
    elif parts:
        merge_at(data, parts[:-1], {parts[-1]: value}, path)
    elif value is not None:
        raise BundleError(f"{path}: the data document at the root must be an object", code="bundle_invalid")


def _manifest(raw: Mapping[str, Any]) -> Manifest:
    revision = raw.get("revision", "")
    if not isinstance(revision, str):
        raise BundleError(".manifest: revision must be a string", code="bundle_invalid")
    roots_raw = raw.get("roots")
    if roots_raw is None:
        roots: tuple[str, ...] = ("",)
    elif isinstance(roots_raw, list) and all(isinstance(r, str) for r in roots_raw):
        roots = tuple(r.strip("/") for r in roots_raw)
    else:
        raise BundleError(".manifest: roots must be a list of strings", code="bundle_invalid")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BundleError(".manifest: metadata must be an object", code="bundle_invalid")
    for index, root in enumerate(roots):
        for other in roots[index + 1:]:
            if roots_overlap(root, other):
                raise BundleError(f"manifest has overlapped roots: '{root}' and '{other}'", code="bundle_invalid")
    return Manifest(revision=revision, roots=roots, metadata=metadata)


def _segments(path: str) -> list[str]:
    return [part for part in path.strip("/").split("/") if part] if path.strip("/") else []


def roots_overlap(a: str, b: str) -> bool:
    """One root is a prefix of the other, segment by segment (``""`` overlaps everything)."""
    first, second = _segments(a), _segments(b)
    shorter = min(len(first), len(second))
    return first[:shorter] == second[:shorter]


def _within(roots: Iterable[str], segments: list[str]) -> bool:
    return any(_segments(root) == segments[:len(_segments(root))] for root in roots)


_PACKAGE = re.compile(r"^\s*package\s+(\S+)", re.MULTILINE)
_REF_PART = re.compile(r'\.?([A-Za-z_][A-Za-z0-9_]*)|\["((?:[^"\\]|\\.)*)"\]')


def package_path(source: str, path: str) -> list[str]:
    """The data path a module's ``package`` declares (``package a.b["c-d"]`` → a, b, c-d)."""
    text = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    match = _PACKAGE.search(text)
    if match is None:
        raise BundleError(f"{path}: no package declaration", code="bundle_invalid")
    ref, parts, pos = match.group(1), [], 0
    while pos < len(ref):
        part = _REF_PART.match(ref, pos)
        if part is None or part.end() == pos:
            raise BundleError(f"{path}: cannot read the package name {ref!r}", code="bundle_invalid")
        parts.append(part.group(1) if part.group(1) is not None else json.loads(f'"{part.group(2)}"'))
        pos = part.end()
    return parts


def _check_roots(manifest: Manifest, modules: Mapping[str, str], data: Mapping[str, Any]) -> None:
    roots = manifest.roots
    for path, source in modules.items():
        package = package_path(source, path)
        if not _within(roots, package):
            raise BundleError(f"manifest roots {list(roots)} do not permit 'data.{'.'.join(package)}' in module "
                              f"'{path}'", code="bundle_invalid")
    _check_data(roots, data, [])


def _check_data(roots: Sequence[str], node: Any, path: list[str]) -> None:
    if _within(roots, path):
        return
    if isinstance(node, dict) and any(_segments(root)[:len(path)] == path for root in roots):
        for key, child in node.items():
            _check_data(roots, child, [*path, key])
        return
    raise BundleError(f"manifest roots {list(roots)} do not permit data at path '/{'/'.join(path)}' (hint: check "
                      "bundle directory structure)", code="bundle_invalid")


def merge(bundles: Sequence[Bundle]) -> PolicySet:
    """Several bundles as one ``PolicySet`` (each bundle's files under its name); refuses
    overlapping roots."""
    if not bundles:
        raise BundleError("no bundle to serve", code="bundle_invalid")
    for index, first in enumerate(bundles):
        for second in bundles[index + 1:]:
            for a in first.manifest.roots:
                for b in second.manifest.roots:
                    if roots_overlap(a, b):
                        raise BundleError(f"bundles {first.name!r} and {second.name!r} have overlapping roots "
                                          f"('{a}' and '{b}')", code="bundle_roots_overlap")
    modules: dict[str, str] = {}
    cases: dict[str, Any] = {}
    data: dict[str, Any] = {}
    caches: list[tuple[str, CacheSettings]] = []
    version = hashlib.sha256()
    for bundle in sorted(bundles, key=lambda b: b.name):
        modules.update({f"{bundle.name}/{path}": src for path, src in bundle.modules.items()})
        cases.update({f"{bundle.name}/{path}": case for path, case in bundle.test_cases.items()})
        try:
            merge_at(data, [], json.loads(json.dumps(bundle.data)), f"bundle {bundle.name}")
        except PolicyError as exc:
            raise BundleError(exc.message, code="bundle_roots_overlap") from None
        if "decision_cache" in bundle.manifest.metadata:
            caches.append((bundle.name, cache_settings({"metadata": bundle.manifest.metadata})))
        version.update(bundle.name.encode() + b"\0" + bundle.digest.encode() + b"\0")
    if len(caches) > 1:
        raise BundleError(f"bundles {', '.join(name for name, _ in caches)} each set metadata.decision_cache: "
                          "only one may", code="bundle_invalid")
    if not modules:
        raise BundleError(f"no .rego module in bundle(s) {', '.join(b.name for b in bundles)}", code="bundle_invalid")
    revision = bundles[0].revision if len(bundles) == 1 else ",".join(
        f"{b.name}={b.revision}" for b in sorted(bundles, key=lambda b: b.name))
    return PolicySet(modules=modules, data=data, test_cases=cases, cache=caches[0][1] if caches else CacheSettings(),
                     version=version.hexdigest()[:16], root="bundle:" + ",".join(sorted(b.name for b in bundles)),
                     revision=revision, files=tuple(sorted({*modules, *cases})))
