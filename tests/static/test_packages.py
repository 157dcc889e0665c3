"""Every package says what it is for and what it offers, and the distribution says it is typed.

Each ``__init__.py`` has a docstring and an ``__all__`` (read with ``ast``, without importing);
every listed name resolves (the lazily exported ones too, see ``authz_server.exports``); the
top-level names are the nouns of a decision plus the error tree (docs/architecture.md), and
``py.typed`` (PEP 561) is in the package and in the wheel's package data.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "authz_server"
GENERATED = {PACKAGE / "_proto"}  # protoc's output, made at install time
INITS = sorted(p for p in PACKAGE.rglob("__init__.py") if p.parent not in GENERATED)


def _name(init: Path) -> str:
    return ".".join(init.parent.relative_to(ROOT).parts)


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            value = ast.literal_eval(node.value)
            return list(value)
    return None


@pytest.mark.parametrize("init", INITS, ids=_name)
def test_a_package_states_its_purpose_and_its_public_names(init: Path) -> None:
    tree = ast.parse(init.read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and len(docstring) > 40, f"{_name(init)}: say what the package is for"
    names = _declared_all(tree)
    assert names, f"{_name(init)}: list the public names in __all__"
    assert len(set(names)) == len(names)
    submodules = {p.stem for p in init.parent.glob("*.py")} | {p.name for p in init.parent.iterdir() if p.is_dir()}
    # importing a submodule sets it on the package, and would shadow an export of that name
    assert [name for name in names if name in submodules] == []
    module = importlib.import_module(_name(init))
    missing = [name for name in names if not hasattr(module, name)]
    assert missing == []


def test_the_top_level_names() -> None:
    import authz_server

    assert set(authz_server.__all__) == {
        "Pipeline", "Decision", "Facts", "Identity", "Verdict", "Config", "load_config",
        "AuthzError", "RequestError", "IdentityError", "TokenError", "SessionError", "WorkloadError", "ReplayError",
        "PolicyError", "UnavailableError", "ConfigError",
    }
    from authz_server.decision import Decision

    assert authz_server.Decision is Decision
    with pytest.raises(AttributeError):
        authz_server.not_a_name  # noqa: B018


def test_the_package_is_marked_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any("py.typed" in patterns for patterns in package_data.values())
