"""Refresh the locks in this folder from pyproject.toml, and say what changed.

    make lock            (runs: python requirements/lock.py, in a throw-away venv with pip-tools)

Three locks, every version pinned with its hashes, so a fresh machine gets exactly what CI got:

* ``dev.lock``: the package with every extra (test, demo, evaluate) plus what building it
  needs (setuptools, wheel, grpcio-tools, since installs run with ``--no-build-isolation``)
  and pip itself. ``make test``, ``make demo`` and ``.ci/run`` install from it.
* ``build.lock`` and ``runtime.lock``: what building the package needs, and what it needs to
  run, at the same versions as ``dev.lock``. The Dockerfile's two stages install from them.

pip-compile resolves everything except the packages in ``OUTSIDE_THE_RESOLVER``: their
metadata claims a newer Python than they need (``opa-golib-python-bindings`` says 3.14; it is
a ctypes wrapper around a Go shared library and runs on 3.11), so pip's resolver refuses them.
They are pinned with ``==`` in pyproject.toml, have no dependencies, and are added to both
locks here with the hashes PyPI publishes for that version; installs pass
``--ignore-requires-python``.

* ``overlay.lock``: packages installed once more, ``--no-deps --force-reinstall``, after the
  others, because another locked package ships older copies of their modules at the same paths
  and pip installs unrelated packages in no set order. ``xds-protos`` carries its own
  ``opentelemetry/proto/**`` (without ``InstrumentationScope``, which the OTLP exporters import);
  whichever of the two pip writes last wins, so the overlay makes ``opentelemetry-proto`` last.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUTSIDE_THE_RESOLVER = {"opa-golib-python-bindings"}
OVERLAID = ["opentelemetry-proto"]  # see overlay.lock above
TOOLING = ["pip"]  # pinned too: the venv's pip is what reads the lock
PIN = re.compile(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", re.M)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9._-]+)", spec)
    if match is None:
        sys.exit(f"lock: cannot read the requirement {spec!r}")
    return canonical(match.group(1))


def pins(text: str) -> dict[str, str]:
    return {canonical(name): version for name, version in PIN.findall(text)}


def outside_pin(spec: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([A-Za-z0-9.]+)\s*", spec)
    if match is None:
        sys.exit(f"lock: {spec!r} is resolved outside pip-compile and must be pinned with == in pyproject.toml")
    return canonical(match.group(1)), match.group(2)


def published_hashes(name: str, version: str) -> list[str]:
    """The sha256 of every file PyPI publishes for ``name==version`` (PEP 691 JSON)."""
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    stem = f"{name.replace('-', '_')}-{version}"
    hashes = sorted(f["hashes"]["sha256"] for f in files
                    if f["filename"].startswith((f"{stem}-", f"{stem}.tar.gz")) and "sha256" in f["hashes"])
    if not hashes:
        sys.exit(f"lock: PyPI lists no files for {name}=={version}")
    return hashes


def pinned_block(name: str, version: str, hashes: list[str]) -> str:
    lines = [f"{name}=={version} \\"] + [f"    --hash=sha256:{h} \\" for h in hashes]
    lines[-1] = lines[-1].removesuffix(" \\")
    return "\n".join(lines) + "\n    # via pyproject.toml (resolved outside pip-compile: see requirements/lock.py)\n"


def locked_block(lock_text: str, name: str) -> str:
    """The pin of ``name`` in a lock, with its hashes and its ``# via`` lines."""
    match = re.search(rf"^{re.escape(name)}==.*?(?=^\S|\Z)", lock_text, re.S | re.M)
    if match is None:
        sys.exit(f"lock: {name} is overlaid but not in the runtime lock")
    return match.group(0)


def compile_lock(requirements: list[str], output: Path, constraint: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{output.stem}.in"
        lines = list(requirements) + ([f"-c {constraint}"] if constraint else [])
        source.write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
                   "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", "--resolver=backtracking",
                   "--no-header", "--rebuild", "-o", str(output), str(source)]
        subprocess.run(command, check=True, cwd=ROOT)
    text = re.sub(r"\n\s*#\s*-c .*\n", "\n", output.read_text())  # no temp paths in the lock
    text = re.sub(r"#   -r /tmp/[^\n]*\n", "#   pyproject.toml\n", text)
    text = re.sub(r"# via -r /tmp/[^\n]*\n", "# via pyproject.toml\n", text)
    output.write_text(text)


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = list(project["project"]["dependencies"])
    extras = sorted({spec for group in project["project"].get("optional-dependencies", {}).values() for spec in group})
    build = list(project["build-system"]["requires"])
    outside = [spec for spec in runtime + extras if requirement_name(spec) in OUTSIDE_THE_RESOLVER]
    inside = lambda specs: [s for s in specs if requirement_name(s) not in OUTSIDE_THE_RESOLVER]  # noqa: E731

    before = {path.name: pins(path.read_text()) for path in HERE.glob("*.lock")}
    header = ("# Generated by `make lock` (requirements/lock.py) from pyproject.toml; do not edit.\n"
              "# Install: pip install --require-hashes --ignore-requires-python -r requirements/{name}\n")
    dev, builder, run = HERE / "dev.lock", HERE / "build.lock", HERE / "runtime.lock"
    compile_lock(inside(runtime + extras + build) + TOOLING, dev, None)
    compile_lock(build + TOOLING, builder, dev)
    compile_lock(inside(runtime) + TOOLING, run, dev)
    blocks = "".join(pinned_block(*outside_pin(spec), published_hashes(*outside_pin(spec))) for spec in outside)
    for path in (dev, builder, run):
        path.write_text(header.format(name=path.name) + path.read_text() + ("" if path is builder else blocks))

    overlay = HERE / "overlay.lock"
    overlay.write_text("# Generated by `make lock` (requirements/lock.py); do not edit. Installed after the other lock:\n"
                       "# pip install --require-hashes --no-deps --force-reinstall -r requirements/overlay.lock\n"
                       + "".join(locked_block(run.read_text(), name) for name in OVERLAID))

    for path in (dev, builder, run, overlay):
        old, new = before.get(path.name, {}), pins(path.read_text())
        changes = [f"  + {n}=={new[n]}" for n in sorted(new.keys() - old.keys())]
        changes += [f"  - {n}=={old[n]}" for n in sorted(old.keys() - new.keys())]
        changes += [f"  ~ {n} {old[n]} -> {new[n]}" for n in sorted(old.keys() & new.keys()) if old[n] != new[n]]
        print(f"{path.relative_to(ROOT)}: {len(new)} packages; " + (f"{len(changes)} changed" if changes else "unchanged"))
        for line in changes:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
