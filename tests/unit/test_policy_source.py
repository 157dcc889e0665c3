"""A policy folder read as OPA reads a bundle directory: modules, data at their folder's path,
``.manifest`` cache settings, test cases, and a content-hash version."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from authz_server.errors import PolicyError
from authz_server.policy.source import CacheSettings, load_policy_set, snapshot

POLICY = "package envoy.authz\nimport rego.v1\ndefault allow := false\n"


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def test_modules_data_and_cases_are_found(tmp_path: Path) -> None:
    write(tmp_path, {
        "policy.rego": POLICY, "lib/util.rego": "package lib\n", "policy_test.rego": "package envoy.authz_test\n",
        "data.json": '{"top": 1}', "services/data.yaml": "orders: {routes: []}\n",
        "services/eu/data.yml": "region: eu\n", "routes_test.yaml": "cases: []\n", "more_test.json": '{"cases": []}',
        "README.md": "ignored", "policy.rego.bak": "ignored", ".hidden/x.rego": "package hidden\n",
        "notes/data.txt": "ignored",
    })
    policy_set = load_policy_set(tmp_path)
    assert set(policy_set.modules) == {"policy.rego", "lib/util.rego", "policy_test.rego"}
    assert set(policy_set.serving_modules) == {"policy.rego", "lib/util.rego"}  # tests never serve
    assert policy_set.data == {"top": 1, "services": {"orders": {"routes": []}, "eu": {"region": "eu"}}}
    assert set(policy_set.test_cases) == {"routes_test.yaml", "more_test.json"}
    assert policy_set.cache == CacheSettings()
    assert policy_set.root == str(tmp_path)
    assert ".hidden/x.rego" not in policy_set.files and "README.md" not in policy_set.files


def test_version_is_a_hash_of_the_contents(tmp_path: Path) -> None:
    a = write(tmp_path / "a", {"policy.rego": POLICY, "data.json": '{"x": 1}'})
    b = shutil.copytree(a, tmp_path / "b")
    os.utime(b / "policy.rego", (1, 1))  # mtimes are not content
    first = load_policy_set(a).version
    assert len(first) == 16 and load_policy_set(b).version == first
    write(b, {"data.json": '{"x": 2}'})
    assert load_policy_set(b).version != first
    write(b, {"data.json": '{"x": 1}', "extra.rego": "package extra\n"})
    assert load_policy_set(b).version != first
    (b / "extra.rego").rename(b / "renamed.rego")
    renamed = load_policy_set(b).version
    (b / "renamed.rego").rename(b / "extra.rego")
    assert renamed != load_policy_set(b).version  # a name is part of the content


def test_snapshot_sees_edits_new_and_removed_files(tmp_path: Path) -> None:
    write(tmp_path, {"policy.rego": POLICY})
    first = snapshot(tmp_path)
    write(tmp_path, {"policy.rego": POLICY + "# longer\n"})
    second = snapshot(tmp_path)
    assert second != first
    write(tmp_path, {"data.json": "{}"})
    third = snapshot(tmp_path)
    assert third != second
    (tmp_path / "data.json").unlink()
    assert snapshot(tmp_path) == second
    assert snapshot(tmp_path / "gone") == ()


def test_manifest_cache_settings(tmp_path: Path) -> None:
    write(tmp_path, {"policy.rego": POLICY, ".manifest": '{"revision": "r42", "metadata": {"decision_cache": '
                                                          '{"key": ["input.attributes.request.http.path", '
                                                          '"identity.user.sub"], "ttl": "1m30s"}}}'})
    policy_set = load_policy_set(tmp_path)
    assert policy_set.cache == CacheSettings(enabled=True, key_paths=("attributes.request.http.path",
                                                                      "identity.user.sub"), ttl=90.0)
    assert policy_set.revision == "r42"
    write(tmp_path, {".manifest": '{"metadata": {"decision_cache": {"enabled": false}}}'})
    assert load_policy_set(tmp_path).cache == CacheSettings(enabled=False)


def test_clock_reading_policies_are_recognised(tmp_path: Path) -> None:
    write(tmp_path, {"policy.rego": POLICY + "allow if time.now_ns() > 0\n"})
    assert load_policy_set(tmp_path).reads_clock
    write(tmp_path, {"policy.rego": POLICY + 'allow if io.jwt.decode_verify("x", {"secret": "s"})[0]\n'})
    assert load_policy_set(tmp_path).reads_clock
    write(tmp_path, {"policy.rego": POLICY + "allow if input.parsed_path[0] == \"time\"\n",
                     "policy_test.rego": "package t\ntest_x if time.now_ns() > 0\n"})
    assert not load_policy_set(tmp_path).reads_clock  # only serving modules count


def test_overlay_replaces_data_at_a_path_and_changes_the_version(tmp_path: Path) -> None:
    write(tmp_path, {"policy.rego": POLICY, "data.yaml": "blocked: {paths: [a]}\nkeep: 1\n"})
    files = load_policy_set(tmp_path)
    overlaid = files.with_overlay({"blocked/paths": ["b", "c"], "new/deep/key": True})
    assert overlaid.data == {"blocked": {"paths": ["b", "c"]}, "keep": 1, "new": {"deep": {"key": True}}}
    assert files.data == {"blocked": {"paths": ["a"]}, "keep": 1}  # the set read from disk is untouched
    assert overlaid.version != files.version
    assert files.with_overlay({"blocked/paths": ["b", "c"], "new/deep/key": True}).version == overlaid.version
    assert files.with_overlay({}) is files


BAD_FOLDERS = {
    "no rego": ({"data.json": "{}"}, "no .rego files"),
    "data not json": ({"policy.rego": POLICY, "x/data.json": "{nope"}, "x/data.json: cannot parse"),
    "data not yaml": ({"policy.rego": POLICY, "data.yaml": "a: [1,\n"}, "data.yaml: cannot parse"),
    "data a list": ({"policy.rego": POLICY, "data.json": "[1, 2]"}, "data.json: the document must be an object"),
    "not utf-8": ({"policy.rego": b"package p\n# \xff\n"}, "policy.rego: not UTF-8"),
    "key twice": ({"policy.rego": POLICY, "data.json": '{"a": {"b": 1}}', "a/data.json": '{"b": 2}'},
                  "a/data.json: data key a.b is defined twice"),
    "data under a value": ({"policy.rego": POLICY, "data.json": '{"a": 1}', "a/data.yaml": "b: 2\n"},
                           "a/data.yaml: data at a conflicts with another data file"),
    "case file not an object": ({"policy.rego": POLICY, "x_test.yaml": "- a\n"},
                                "x_test.yaml: the document must be an object"),
    "manifest not json": ({"policy.rego": POLICY, ".manifest": "revision: 1"}, ".manifest: cannot parse"),
    "cache not an object": ({"policy.rego": POLICY, ".manifest": '{"metadata": {"decision_cache": true}}'},
                            "metadata.decision_cache must be an object"),
    "cache enabled not a bool": ({"policy.rego": POLICY, ".manifest": '{"metadata": {"decision_cache": '
                                                                      '{"enabled": "no"}}}'},
                                 "decision_cache.enabled must be a boolean"),
    "cache key not a list": ({"policy.rego": POLICY, ".manifest": '{"metadata": {"decision_cache": '
                                                                  '{"key": "input.x"}}}'},
                             "decision_cache.key must be a list of input paths"),
    "cache key empty path": ({"policy.rego": POLICY, ".manifest": '{"metadata": {"decision_cache": {"key": [""]}}}'},
                             "decision_cache.key must be a list of input paths"),
    "cache ttl bad": ({"policy.rego": POLICY, ".manifest": '{"metadata": {"decision_cache": {"ttl": "soon"}}}'},
                      "decision_cache.ttl: expected a duration"),
    "cache ttl nan": ({"policy.rego": POLICY, ".manifest": '{"metadata": {"decision_cache": {"ttl": "nan"}}}'},
                      "decision_cache.ttl must be a finite duration"),
    "cache ttl inf": ({"policy.rego": POLICY, ".manifest": '{"metadata": {"decision_cache": {"ttl": "1e999"}}}'},
                      "decision_cache.ttl must be a finite duration"),
}


@pytest.mark.parametrize(("files", "message"), BAD_FOLDERS.values(), ids=BAD_FOLDERS.keys())
def test_a_bad_folder_is_refused_naming_the_file(tmp_path: Path, files: dict[str, str | bytes],
                                                 message: str) -> None:
    write(tmp_path, files)
    with pytest.raises(PolicyError) as error:
        load_policy_set(tmp_path)
    assert error.value.code == "policy_load_error"
    assert message in error.value.message


def test_a_missing_folder_or_a_file_instead(tmp_path: Path) -> None:
    for root in (tmp_path / "gone", write(tmp_path, {"file.rego": POLICY}) / "file.rego"):
        with pytest.raises(PolicyError) as error:
            load_policy_set(root)
        assert "does not exist or is not a folder" in error.value.message


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    write(tmp_path, {"policy.rego": POLICY})
    (tmp_path / "broken.rego").symlink_to(tmp_path / "nowhere.rego")
    with pytest.raises(PolicyError) as error:
        load_policy_set(tmp_path)
    assert error.value.message.startswith("broken.rego: cannot read")
