"""Trees of paths into a JSON document, and what they keep of it.

A ``Tree`` maps a key to its subtree, or to ``True`` for "keep everything below": the
parts of ``input`` a policy reads (``policy.inputs.input_paths``), the per-request parts of
``input.attributes`` (``facts.VOLATILE_ATTRIBUTES``), the signals a policy can see. Both the
request side (facts, the fronts) and the policy side use these helpers, so they live apart
from either.
"""

from __future__ import annotations

from typing import Any, Mapping

Tree = dict[str, Any]  # key -> subtree, or True for "keep everything below"


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


__all__ = ["Tree", "leaf_paths", "named_within", "overlaps", "project", "subtract", "values_at", "without"]
