"""Write deploy/kubernetes/policies/ from the repository's policies/, with SPIFFE IDs in Istio's form.

In the compose and embedded meshes a workload is spiffe://example.org/<service>; under Istio
with SPIRE it is spiffe://example.org/ns/<namespace>/sa/<service account>. The Kubernetes
policy set is the repository's, with that one rewrite, so its own tests (authz_test.yaml)
still pass before every load. tests/static/test_deploy.py checks the copy is current:

    python deploy/kubernetes/sync-policies.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "policies"
TARGET = Path(__file__).resolve().parent / "policies"
NAMESPACE = "demo"
SERVICES = ("frontend", "orders", "payments")
_ID = re.compile(r"spiffe://example\.org/(" + "|".join(SERVICES) + r")(?![\w/-])")


def istio_form(text: str) -> str:
    return _ID.sub(lambda m: f"spiffe://example.org/ns/{NAMESPACE}/sa/{m.group(1)}", text)


def expected_files() -> dict[str, str]:
    return {path.name: istio_form(path.read_text()) for path in sorted(SOURCE.iterdir())
            if path.is_file() and path.suffix in {".rego", ".yaml", ".yml", ".json"}}


def main() -> int:
    TARGET.mkdir(exist_ok=True)
    expected = expected_files()
    for name, text in expected.items():
        (TARGET / name).write_text(text)
        print(f"wrote {TARGET / name}")
    for stale in TARGET.iterdir():
        if stale.name not in expected:
            stale.unlink()
            print(f"removed {stale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
