"""mypy in strict mode is clean on the decision core.

The modules are the ``[tool.mypy] files`` of pyproject.toml: ``decision``, ``facts``,
``response``, ``decisioncache``, ``trees``, ``errors`` and the ``policy`` and ``identity``
packages, the parts a newcomer reads first and where a wrong type is a wrong decision; and
the HTTP front, signals and config reading around them.
Modules they import are read for their types, not reported on (``follow_imports = silent``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_on_the_core() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
