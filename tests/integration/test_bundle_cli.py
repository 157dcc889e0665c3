"""``authz-server bundle build | sign | verify`` as a user runs them (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz_server.bundles.archive import read_tarball
from authz_server.bundles.bundle import load_bundle
from authz_server.bundles.signing import KeyConfig, VerificationConfig


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authz_server.cli", "bundle", *args], capture_output=True,
                          text=True, timeout=120)


def test_build_sign_and_verify_a_bundle(tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    (folder / "envoy" / "authz").mkdir(parents=True)
    (folder / "envoy" / "authz" / "policy.rego").write_text("package envoy.authz\nimport rego.v1\n"
                                                           "default allow := false\n")
    (folder / "envoy" / "authz" / "data.yaml").write_text("admins: [alice]\n")
    (folder / ".manifest").write_text(json.dumps({"roots": ["envoy"]}))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "private.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = tmp_path / "public.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    out = tmp_path / "bundle.tar.gz"
    built = _cli("build", "-b", str(folder), "-o", str(out), "-r", "v42", "--signing-key", str(private))
    assert built.returncode == 0, built.stderr
    assert "revision 'v42'" in built.stdout and "signed" in built.stdout
    names = {name for name, _ in read_tarball(out.read_bytes())}
    assert names == {".manifest", ".signatures.json", "envoy/authz/policy.rego", "envoy/authz/data.yaml"}
    verification = VerificationConfig(keys={"k": KeyConfig(key=public.read_text())}, keyid="k", required=True)
    assert load_bundle("authz", out.read_bytes(), verification=verification).revision == "v42"

    ok = _cli("verify", str(out), "--verification-key", str(public))
    assert ok.returncode == 0 and "signature verified" in ok.stdout, ok.stderr
    other = tmp_path / "other.pem"
    other.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    bad = _cli("verify", str(out), "--verification-key", str(other))
    assert bad.returncode == 1 and "bundle_signature_invalid" in bad.stderr

    signed = _cli("sign", "--bundle", str(folder), "--signing-key", "an HMAC secret of some length",
                  "--signing-alg", "HS256", "-o", str(tmp_path))
    assert signed.returncode == 0, signed.stderr
    signatures = json.loads((tmp_path / ".signatures.json").read_text())
    assert len(signatures["signatures"]) == 1

    broken = tmp_path / "broken"
    (broken / "other").mkdir(parents=True)
    (broken / ".manifest").write_text(json.dumps({"roots": ["envoy"]}))
    (broken / "other" / "p.rego").write_text("package other\n")
    refused = _cli("build", str(broken), "-o", str(tmp_path / "broken.tar.gz"))
    assert refused.returncode == 1 and "do not permit" in refused.stderr
