"""A policy folder read into one immutable, versioned ``PolicySet``.

Loaded the way OPA loads a bundle directory: every ``.rego`` file is a module; every
``data.json`` / ``data.yaml`` is merged into ``data`` at the path of its folder
(``a/b/data.json`` lands at ``data.a.b``); an OPA ``.manifest`` may carry our decision
cache settings under ``metadata.decision_cache``. The version is a content hash, so two
hosts with the same files agree on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import PolicyError

DATA_FILES = ("data.json", "data.yaml", "data.yml")
TEST_CASE_SUFFIXES = ("_test.yaml", "_test.yml", "_test.json")
MAX_FILE_BYTES = 8 * 1024 * 1024

_CLOCK_BUILTINS = re.compile(r"\btime\.now_ns\b|\bio\.jwt\.decode_verify\b|\bio\.jwt\.verify_\w+")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Decision cache knobs a policy set may declare in its ``.manifest``."""

    enabled: bool = True
    key_paths: tuple[str, ...] = ()  # empty: the whole input minus volatile fields
    ttl: float | None = None  # None: the server's default


@dataclass(frozen=True)
class PolicySet:
    modules: Mapping[str, str]  # relative path -> Rego source
    data: Mapping[str, Any]
    test_cases: Mapping[str, Any]  # relative path -> parsed case file
    cache: CacheSettings
    version: str
    root: str = ""
    revision: str = ""
    files: tuple[str, ...] = field(default=())

    def with_overlay(self, overlay: Mapping[str, Any]) -> "PolicySet":
        """This set with runtime data laid over the files' (path ``a/b`` replaces ``data.a.b``);
        its version covers both."""
        if not overlay:
            return self
        data = json.loads(json.dumps(self.data))  # a deep copy of plain JSON
        for path, value in sorted(overlay.items()):
            parts = [p for p in path.split("/") if p]
            node = data
            for part in parts[:-1]:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            if parts:
                node[parts[-1]] = value
        digest = hashlib.sha256(self.version.encode() + json.dumps(overlay, sort_keys=True).encode()).hexdigest()
        return PolicySet(modules=self.modules, data=data, test_cases=self.test_cases, cache=self.cache,
                         version=digest[:16], root=self.root, revision=self.revision, files=self.files)

    @property
    def serving_modules(self) -> dict[str, str]:
        """The modules decisions use: test modules (``*_test.rego``) are left out."""
        return {name: src for name, src in self.modules.items() if not is_test_module(name)}

    @property
    def reads_clock(self) -> bool:
        """True when a decision can change with time alone (``time.now_ns``, JWT expiry)."""
        return any(_CLOCK_BUILTINS.search(src) for src in self.serving_modules.values())


def is_test_module(name: str) -> bool:
    return name.endswith("_test.rego")


def snapshot(root: str | os.PathLike[str]) -> tuple[tuple[str, int, int], ...]:
    """A cheap fingerprint of the folder (names, sizes, mtimes) to poll for changes."""
    entries = []
    for path in _policy_files(Path(root)):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def _policy_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".rego") or name in DATA_FILES or name == ".manifest" or name.endswith(TEST_CASE_SUFFIXES):
                found.append(Path(dirpath) / name)
    return found


def load_policy_set(root: str | os.PathLike[str]) -> PolicySet:
    """Read ``root``; raises ``PolicyError(code="policy_load_error")`` naming the bad file."""
    base = Path(root)
    if not base.is_dir():
        raise PolicyError(f"policy folder {str(base)!r} does not exist or is not a folder", code="policy_load_error")
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    cases: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    digest = hashlib.sha256()
    files = []
    for path in _policy_files(base):
        rel = path.relative_to(base).as_posix()
        raw = _read(path, rel)
        digest.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
        files.append(rel)
        text = _decode(raw, rel)
        if rel.endswith(".rego"):
            modules[rel] = text
        elif path.name in DATA_FILES:
            merge_at(data, list(path.parent.relative_to(base).parts), parse_document(text, rel), rel)
        elif path.name == ".manifest":
            manifest = parse_document(text, rel)
        else:
            cases[rel] = parse_document(text, rel)
    if not modules:
        raise PolicyError(f"no .rego files in {str(base)!r}", code="policy_load_error")
    return PolicySet(
        modules=modules, data=data, test_cases=cases, cache=cache_settings(manifest),
        version=digest.hexdigest()[:16], root=str(base), revision=str(manifest.get("revision", "")),
        files=tuple(files),
    )


def load_documents(paths: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """What ``opa eval -d PATH...`` loads: ``.rego`` modules and data, from files or folders.
    In a folder, ``a/b/data.json`` (or ``.yaml``) lands at ``data.a.b``, as in a bundle; a data
    file named on its own is merged at the root. Modules are named by the path as given."""
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    for given in paths:
        base = Path(given)
        if base.is_dir():
            files = [(p, list(p.parent.relative_to(base).parts)) for p in _policy_files(base)
                     if p.name.endswith(".rego") or p.name in DATA_FILES]
        elif base.is_file():
            if not base.name.endswith((".rego", ".json", ".yaml", ".yml")):
                raise PolicyError(f"{given}: not a .rego, .json or .yaml file", code="policy_load_error")
            files = [(base, [])]
        else:
            raise PolicyError(f"{given}: no such file or folder", code="policy_load_error")
        for path, prefix in files:
            name = str(path)
            text = _decode(_read(path, name), name)
            if name.endswith(".rego"):
                modules[name] = text
            else:
                merge_at(data, prefix, parse_document(text, name), name)
    return modules, data


def _read(path: Path, rel: str) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PolicyError(f"{rel}: larger than {MAX_FILE_BYTES} bytes", code="policy_load_error")
        return path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{rel}: cannot read: {exc.strerror}", code="policy_load_error") from None


def _decode(raw: bytes, rel: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{rel}: not UTF-8", code="policy_load_error") from None


def parse_document(text: str, rel: str) -> Any:
    """A data, manifest or test-case file's value (JSON by its suffix, else YAML); errors name ``rel``.
    Shared with ``bundles.bundle``, which reads the same files out of a tarball."""
    try:
        value = json.loads(text) if rel.endswith((".json", ".manifest")) else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PolicyError(f"{rel}: cannot parse: {str(exc).splitlines()[0]}", code="policy_load_error") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise PolicyError(f"{rel}: the document must be an object", code="policy_load_error")
    return value


def merge_at(target: dict[str, Any], path: list[str], value: dict[str, Any], rel: str) -> None:
    """Merge ``value`` into ``target`` at ``path`` (a data file's folder), refusing a conflict
    with what an earlier file put there, as OPA does."""
    node = target
    for part in path:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PolicyError(f"{rel}: data at {'.'.join(path)} conflicts with another data file", code="policy_load_error")
        node = child
    for key, item in value.items():
        if key in node and isinstance(node[key], dict) and isinstance(item, dict):
            merge_at(node, [key], item, rel)
        elif key in node:
            raise PolicyError(f"{rel}: data key {'.'.join([*path, key])} is defined twice", code="policy_load_error")
        else:
            node[key] = item


def cache_settings(manifest: Mapping[str, Any]) -> CacheSettings:
    """The manifest's ``metadata.decision_cache`` (key paths, TTL), checked."""
    metadata = manifest.get("metadata") or {}
    raw = metadata.get("decision_cache") if isinstance(metadata, dict) else None
    if raw is None:
        return CacheSettings()
    if not isinstance(raw, dict):
        raise PolicyError(".manifest: metadata.decision_cache must be an object", code="policy_load_error")
    enabled = raw.get("enabled", True)
    key_paths = raw.get("key", [])
    ttl = raw.get("ttl")
    if not isinstance(enabled, bool):
        raise PolicyError(".manifest: metadata.decision_cache.enabled must be a boolean", code="policy_load_error")
    if not isinstance(key_paths, list) or not all(isinstance(p, str) and p for p in key_paths):
        raise PolicyError(".manifest: metadata.decision_cache.key must be a list of input paths", code="policy_load_error")
    if ttl is not None:
        from ..durations import parse_duration

        try:
            ttl = parse_duration(ttl)
        except ValueError as exc:
            raise PolicyError(f".manifest: metadata.decision_cache.ttl: {exc}", code="policy_load_error") from None
        if not math.isfinite(ttl):  # NaN never compares as expired: the entry would live forever
            raise PolicyError(f".manifest: metadata.decision_cache.ttl must be a finite duration, got {raw['ttl']!r}",
                              code="policy_load_error")
    return CacheSettings(enabled=enabled, key_paths=tuple(p.removeprefix("input.") for p in key_paths), ttl=ttl)
