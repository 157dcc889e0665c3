"""`make bench` runs end to end: every section, with one-second loads (``--smoke``).

The numbers of a smoke run mean nothing; what this holds is that the benchmark the README's
figures come from still runs on a fresh machine, and that its traffic checks find no wrong
answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.__main__ import SECTIONS
from tests.bench.harness import wrk_binary

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1500)  # a dozen sections, each starting Envoys and servers
@pytest.mark.skipif(wrk_binary() is None, reason="wrk is not installed (Debian: apt-get install wrk)")
def test_every_bench_section_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "tests.bench", "--smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(SECTIONS) <= set(results), set(SECTIONS) - set(results)
    traffic = results["traffic"]["envoy"]
    for name, result in traffic.items():
        if name.startswith("bare"):
            continue  # the yardstick allows everything: its wrong allows are the point of comparison
        counts = result["extra"].get("counts", {})
        assert counts.get("wrong", 0) == 0, (name, counts)
        assert result["extra"].get("wrong_sample", 0) == 0, (name, result["extra"])
        assert result["requests"] > 0 and result["errors"] == 0, (name, result)
