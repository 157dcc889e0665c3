"""OPA's own signed-bundle cases (tests/vectors/opa_bundle/signatures.json), one runner.

Each case keeps OPA's token, keys and expected outcome; ``expect`` is ``ok`` or the code our
verifier gives for the error OPA reports (quoted as ``opa_error``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz_server.bundles.errors import BundleError
from authz_server.bundles.hashing import file_digest
from authz_server.bundles.signing import FileInfo, KeyConfig, VerificationConfig, verify_file, verify_signatures

VECTORS = json.loads((Path(__file__).parents[2] / "vectors" / "opa_bundle" / "signatures.json").read_text())


def _config(case: dict[str, Any]) -> VerificationConfig:
    keys = {kid: KeyConfig(key=k["key"], algorithm=k["algorithm"]) for kid, k in case["keys"].items()}
    return VerificationConfig(keys=keys, keyid=case["keyid"], scope=case["scope"])


@pytest.mark.parametrize("case", VECTORS["signature_cases"], ids=lambda c: c["id"])
def test_signature_case(case: dict[str, Any]) -> None:
    tokens = case["signatures"] if "signatures" in case else [case["token"]]
    if case["expect"] == "ok":
        files = verify_signatures(tokens, _config(case))
        if "files" in case:
            assert len(files) == case["files"]
    else:
        with pytest.raises(BundleError) as raised:
            verify_signatures(tokens, _config(case))
        assert raised.value.code == case["expect"], raised.value.message


@pytest.mark.parametrize("case", VECTORS["file_cases"], ids=lambda c: c["id"])
def test_file_case(case: dict[str, Any]) -> None:
    signed = {name: FileInfo(**info) for name, info in case["signed"].items()}
    with pytest.raises(BundleError) as raised:
        verify_file(case["path"], case["content"].encode(), signed)
    assert raised.value.code == case["expect"]
    if "digest mismatch" in case["opa_error"]:
        assert raised.value.message == case["opa_error"]


@pytest.mark.parametrize("case", VECTORS["digest_cases"], ids=lambda c: c["id"])
def test_digest_case(case: dict[str, Any]) -> None:
    assert file_digest(case["path"], case["content"].encode(), case["algorithm"]) == case["digest"]
