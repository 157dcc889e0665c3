"""Give the engine only the parts of ``input`` the policy set can read.

Converting the input document into the engine's form costs about as much per value as a
policy rule; a typical ext_authz input has ~60 values while a policy reads a handful.
``input_paths`` reads the Rego sources for every reference to ``input`` (directly or
through ``import input.a.b [as x]`` aliases) and returns the literal key chains used;
``project`` keeps just those subtrees.

The analysis is conservative. It gives up (the whole input is passed) on anything it cannot
follow: a bare ``input`` (``object.get(input, …)``, ``walk(input)``), a dynamic key right
after ``input`` (``input[k]``), or ``with input`` in a serving module. A chain that
continues with a dynamic part keeps the whole subtree where the literal part ends, and a
list is always kept whole. Reading more than the policy needs is harmless; reading less
never happens for references the grammar allows.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

Tree = dict[str, Any]  # key -> subtree, or True for "keep everything below"

_IMPORT = re.compile(r"^\s*import\s+input((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\"[^\"\\]*\"\])*)(?:\s+as\s+([A-Za-z_][A-Za-z0-9_]*))?\s*$",
                     re.M)
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*\"((?:[^\"\\]|\\.)*)\"\s*\]|\[\s*(\d+)\s*\]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _code_only(source: str) -> str:
    """The source with comments blanked and string contents kept (keys can be strings)."""
    out = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "#":
            while i < n and source[i] != "\n":
                out.append(" ")
                i += 1
            continue
        if c == '"':
            j = i + 1
            while j < n and source[j] != '"':
                j += 2 if source[j] == "\\" else 1
            out.append(source[i:j + 1])
            i = j + 1
            continue
        if c == "`":
            j = source.find("`", i + 1)
            j = n - 1 if j < 0 else j
            out.append(" " * (j - i + 1))  # raw strings never hold references
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _blank_strings(code: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: " " * len(m.group(0)), code)


def _chain(code: str, start: int) -> list[str]:
    """Literal key chain starting at ``start`` (right after a root identifier)."""
    keys: list[str] = []
    pos = start
    while True:
        match = _SEGMENT.match(code, pos)
        if match is None:
            return keys
        key = match.group(1) or match.group(2) or match.group(3)
        if match.group(2) is not None:
            key = bytes(match.group(2), "utf-8").decode("unicode_escape")
        keys.append(key)
        pos = match.end()


def _parse_import_chain(text: str) -> list[str]:
    return _chain(text, 0)


def _references(module: str) -> Iterator[list[str]] | None:
    code = _code_only(module)
    searchable = _blank_strings(code)
    roots: dict[str, list[str]] = {"input": []}
    for match in _IMPORT.finditer(code):
        chain = _parse_import_chain(match.group(1))
        alias = match.group(2) or (chain[-1] if chain else "input")
        roots[alias] = chain
    import_spans = [(m.start(), m.end()) for m in _IMPORT.finditer(code)]
    if re.search(r"\bwith\s+input\b", searchable):
        return None
    found: list[list[str]] = []
    for match in _IDENT.finditer(searchable):
        name = match.group(0)
        if name not in roots:
            continue
        start = match.start()
        if start > 0 and searchable[start - 1] == ".":
            continue  # a field called like the root, e.g. request.http
        if any(a <= start < b for a, b in import_spans):
            continue
        after = match.end()
        if code.startswith(":=", after) or re.match(r"\s*:=", code[after:after + 4]):
            continue  # a local of that name, defined here
        chain = _chain(code, after)
        path = roots[name] + chain
        if not path:
            return None  # bare input: the whole document is needed
        if name == "input" and not chain and re.match(r"\s*\[", code[after:after + 3]):
            return None
        found.append(path)
    return iter(found)


def input_paths(modules: Mapping[str, str]) -> Tree | None:
    """The projection tree for these modules, or None when the whole input is needed."""
    tree: Tree = {}
    for source in modules.values():
        references = _references(source)
        if references is None:
            return None
        for path in references:
            node = tree
            for index, key in enumerate(path):
                existing = node.get(key)
                if existing is True:
                    break
                if index == len(path) - 1:
                    node[key] = True
                else:
                    if existing is None:
                        existing = node[key] = {}
                    node = existing
    return tree


def project(document: Any, tree: Tree | None) -> Any:
    if tree is None:
        return document
    if not isinstance(document, dict):
        return document
    out: dict[str, Any] = {}
    for key, sub in tree.items():
        if key not in document:
            continue
        value = document[key]
        if sub is True or not isinstance(value, dict):
            out[key] = value
        elif kept := project(value, sub):
            # An object left empty by the projection reads as undefined all the same, below
            # every path the policy names; leaving it out keeps equal inputs equal (cache keys).
            out[key] = kept
    return out


def without(document: Any, tree: Tree) -> Any:
    """``document`` with every path ``tree`` names taken out; parts it does not touch are
    shared, not copied."""
    if not isinstance(document, dict):
        return document
    out = dict(document)
    for key, sub in tree.items():
        if key not in out:
            continue
        if sub is True:
            del out[key]
        else:
            out[key] = without(out[key], sub)
    return out


def subtract(tree: Tree, other: Tree) -> Tree:
    """The leaves of ``tree`` that ``other`` names no part of."""
    out: Tree = {}
    for key, sub in tree.items():
        limit = other.get(key)
        if limit is True or (limit is not None and sub is True):
            continue  # named, whole or in part
        if limit is None:
            out[key] = sub
        elif inner := subtract(sub, limit):
            out[key] = inner
    return out


def overlaps(tree: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Does ``tree`` keep any part of what ``other`` keeps?"""
    for key, sub in tree.items():
        limit = other.get(key)
        if limit is not None and (sub is True or limit is True or overlaps(sub, limit)):
            return True
    return False


def named_within(tree: Tree, within: Tree) -> Tree:
    """The parts of ``within`` that ``tree`` names down to one of its leaves (or below it).
    A subtree ``tree`` keeps whole above those leaves does not count: it reads something
    there, but not by name."""
    out: Tree = {}
    for key, sub in tree.items():
        limit = within.get(key)
        if limit is True:
            out[key] = sub
        elif isinstance(limit, dict) and isinstance(sub, dict):
            inner = named_within(sub, limit)
            if inner:
                out[key] = inner
    return out


def leaf_paths(tree: Tree, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every path the tree keeps, in a stable order (for cache keys)."""
    paths: list[tuple[str, ...]] = []
    for key in sorted(tree):
        sub = tree[key]
        paths.extend([(*prefix, key)] if sub is True else leaf_paths(sub, (*prefix, key)))
    return paths


def values_at(document: Any, paths: tuple[tuple[str, ...], ...]) -> tuple[Any, ...]:
    out = []
    for path in paths:
        node = document
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        out.append(node)
    return tuple(out)
