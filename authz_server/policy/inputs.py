"""Give the engine only the parts of ``input`` the policy set can read.

Converting the input document into the engine's form costs about as much per value as a
policy rule; a typical ext_authz input has ~60 values while a policy reads a handful.
``input_paths`` reads the Rego sources for every reference to ``input`` (directly or
through ``import input.a.b [as x]`` aliases) and returns the literal key chains used;
``trees.project`` keeps just those subtrees.

The analysis is conservative. It gives up (the whole input is passed) on anything it cannot
follow: a bare ``input`` (``object.get(input, …)``, ``walk(input)``), a dynamic key right
after ``input`` (``input[k]``), or ``with input`` in a serving module. A chain that
continues with a dynamic part keeps the whole subtree where the literal part ends, and a
list is always kept whole. Reading more than the policy needs is harmless; reading less
never happens for references the grammar allows.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

from ..trees import Tree

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


__all__ = ["Tree", "input_paths"]
