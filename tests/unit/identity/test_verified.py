"""The identity headers' strip rule, which both fronts render (envoy.py, httpfront.py)."""

from __future__ import annotations

from authz_server.identity.verified import IDENTITY_HEADERS, upstream_removals


def test_identity_headers_not_set_are_removed() -> None:
    assert upstream_removals((), ()) == list(IDENTITY_HEADERS)


def test_a_header_set_is_not_removed_whatever_its_case() -> None:
    assert upstream_removals((("X-Authz-Subject", "alice"),), ("authorization",)) == [
        "authorization", "x-authz-spiffe-id"]


def test_no_name_twice() -> None:
    assert upstream_removals((), ("x-authz-subject", "cookie")) == ["x-authz-subject", "cookie", "x-authz-spiffe-id"]
