"""SPIFFE IDs and trust domains, against the SPIFFE ID standard.

Vectors: the examples and rules of the SPIFFE ID standard (spiffe/spiffe
``standards/SPIFFE-ID.md`` §2, §2.1, §2.2, §2.3), and the parsing cases of the reference
implementation's test suite (go-spiffe v2 ``spiffeid/id_test.go`` ``TestFromString``: every
byte 0-255 as trust-domain and path character, bad schemes, missing trust domain, empty and
dot segments), whose error wording ours follows.
"""

from __future__ import annotations

import pytest

from authz_server.errors import WorkloadError
from authz_server.identity.spiffe import SpiffeId, TrustDomain, accept_trust_domains, split_spiffe_id

TD_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")
PATH_CHARS = TD_CHARS | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

VALID = [
    # (id, trust domain, path)
    ("spiffe://trustdomain", "trustdomain", ""),  # "path is optional"
    ("spiffe://trustdomain/path", "trustdomain", "/path"),
    ("spiffe://trustdomain/.path", "trustdomain", "/.path"),  # dots, but not a dot segment
    ("spiffe://trustdomain/..path", "trustdomain", "/..path"),
    ("spiffe://trustdomain/...", "trustdomain", "/..."),
    # SPIFFE-ID.md §2.2 examples
    ("spiffe://staging.example.com/payments/mysql", "staging.example.com", "/payments/mysql"),
    ("spiffe://staging.example.com/payments/web-fe", "staging.example.com", "/payments/web-fe"),
    ("spiffe://k8s-west.example.com/ns/staging/sa/default", "k8s-west.example.com", "/ns/staging/sa/default"),
    ("spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453", "example.com",
     "/9eebccd2-12bf-40a6-b262-65fe0487d453"),
    # §2.1 "this definition does not exclude IPv4 addresses in dotted-quad notation"
    ("spiffe://192.168.0.1/service", "192.168.0.1", "/service"),
    # §2.1: names other than DNS names are fine ("trust_domain_name.example.com")
    ("spiffe://trust_domain_name.example.com/Mixed_Case-Path.v2", "trust_domain_name.example.com",
     "/Mixed_Case-Path.v2"),
]

INVALID = [
    # (id, why) — the reason is part of the message, after the quoted input
    ("", "cannot be empty"),
    ("s", "scheme is missing or invalid"),
    ("spiffe:/", "scheme is missing or invalid"),
    ("spiffe:path/element", "scheme is missing or invalid"),
    ("Spiffe://trustdomain/path", "scheme is missing or invalid"),
    ("SPIFFE://trustdomain/path", "scheme is missing or invalid"),
    ("http://trustdomain/path", "scheme is missing or invalid"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///", "trust domain is missing"),
    ("spiffe:///path/element", "trust domain is missing"),
    ("spiffe://trustdomain/", "path cannot have a trailing slash"),
    ("spiffe://trustdomain/path/", "path cannot have a trailing slash"),
    ("spiffe://trustdomain//", "path cannot contain empty segments"),
    ("spiffe://trustdomain//path", "path cannot contain empty segments"),
    ("spiffe://trustdomain/path//element", "path cannot contain empty segments"),
    ("spiffe://trustdomain/.", "path cannot contain dot segments"),
    ("spiffe://trustdomain/./path", "path cannot contain dot segments"),
    ("spiffe://trustdomain/path/./other", "path cannot contain dot segments"),
    ("spiffe://trustdomain/path/..", "path cannot contain dot segments"),
    ("spiffe://trustdomain/..", "path cannot contain dot segments"),
    ("spiffe://trustdomain/../path", "path cannot contain dot segments"),
    ("spiffe://trustdomain/path/../other", "path cannot contain dot segments"),
    # §2.1 "The host part of the authority MUST be lowercase"
    ("spiffe://TrustDomain/path", "trust domain characters are limited"),
    # §2.1 "The userinfo and port parts of the authority component MUST be empty"
    ("spiffe://domain.test:8080/path", "trust domain characters are limited"),
    ("spiffe://domain.test:/path", "trust domain characters are limited"),
    ("spiffe://user:password@test.org/path", "trust domain characters are limited"),
    # §2.1: IPv6 addresses are excluded
    ("spiffe://[::1]/path", "trust domain characters are limited"),
    # §2.1 / §2.2 "MUST NOT contain percent-encoded characters"
    ("spiffe://domain%2Etest/path", "trust domain characters are limited"),
    ("spiffe://domain.test/pa%41th", "path segment characters are limited"),
    # §2 "MUST NOT include a query or fragment component"
    ("spiffe://domain.test/path/element?query=1", "path segment characters are limited"),
    ("spiffe://domain.test/path/element#fragment-1", "path segment characters are limited"),
    ("spiffe://domain.test?query=1", "trust domain characters are limited"),
    # characters that RFC 3986 allows in a path but §2.2 does not
    ("spiffe://domain.test/pa:th/element", "path segment characters are limited"),
    ("spiffe://domain.test/pa@th", "path segment characters are limited"),
    ("spiffe://domain.test/p!a$t&h'/(e)l*e+m,e;n=t", "path segment characters are limited"),
    ("spiffe://domain.test/caf\u00e9", "path segment characters are limited"),
    ("spiffe://domain.test/with space", "path segment characters are limited"),
]


@pytest.mark.parametrize(("text", "domain", "path"), VALID, ids=[v[0] for v in VALID])
def test_valid_ids_parse_into_their_parts(text: str, domain: str, path: str) -> None:
    parsed = SpiffeId.parse(text)
    assert parsed.trust_domain == TrustDomain(domain) and parsed.path == path
    assert str(parsed) == text  # only canonical spellings exist, so they round-trip
    assert split_spiffe_id(text) == (domain, path)
    assert parsed.member_of(domain) and parsed.member_of(TrustDomain(domain))
    assert not parsed.member_of("other." + domain)


@pytest.mark.parametrize(("text", "why"), INVALID, ids=[v[0] or "empty" for v in INVALID])
def test_invalid_ids_are_refused_saying_why_but_not_quoting_the_input(text: str, why: str) -> None:
    """The text can come from a request, and what a request carries never reaches the log."""
    with pytest.raises(WorkloadError) as caught:
        SpiffeId.parse(text)
    assert caught.value.code == "invalid_spiffe_id"
    assert why in caught.value.message
    assert f"of {len(text)} characters" in caught.value.message
    assert len(text) < 12 or text[8:] not in caught.value.message
    with pytest.raises(WorkloadError):
        split_spiffe_id(text)


@pytest.mark.parametrize("byte", [b for b in range(256) if b != ord("/")], ids=lambda b: f"{b:02X}")
def test_every_byte_as_trust_domain_and_path_character(byte: int) -> None:
    char = chr(byte)
    in_domain = f"spiffe://trustdomain{char}/path"
    if char in TD_CHARS:
        assert SpiffeId.parse(in_domain).trust_domain.name == f"trustdomain{char}"
    else:
        with pytest.raises(WorkloadError, match="trust domain characters are limited"):
            SpiffeId.parse(in_domain)
    in_path = f"spiffe://trustdomain/path{char}"
    if char in PATH_CHARS:
        assert SpiffeId.parse(in_path).path == f"/path{char}"
    else:
        with pytest.raises(WorkloadError, match="path segment characters are limited"):
            SpiffeId.parse(in_path)


def test_length_limits_of_section_2_3() -> None:
    # "SPIFFE implementations MUST support SPIFFE URIs up to 2048 bytes in length"
    prefix = "spiffe://example.org/"
    longest = prefix + "a" * (2048 - len(prefix))
    assert str(SpiffeId.parse(longest)) == longest
    with pytest.raises(WorkloadError, match="longer than 2048 bytes"):
        SpiffeId.parse(longest + "a")
    # "a maximum length of a trust domain name is 255 bytes"
    assert TrustDomain.parse("d" * 255).name == "d" * 255
    with pytest.raises(WorkloadError, match="longer than 255 bytes"):
        TrustDomain.parse("d" * 256)


def test_trust_domains_from_a_name_or_an_id() -> None:
    domain = TrustDomain.parse("example.org")
    assert domain == TrustDomain.parse("spiffe://example.org") == TrustDomain.parse("spiffe://example.org/web")
    assert str(domain) == "example.org" and domain.id == "spiffe://example.org"
    for bad in ("", "Example.org", "example.org:443", "spiffe://", "example.org/path", "exa mple.org"):
        with pytest.raises(WorkloadError) as caught:
            TrustDomain.parse(bad)
        assert caught.value.code == "invalid_spiffe_id"


def test_ids_are_values() -> None:
    first, second = SpiffeId.parse("spiffe://example.org/web"), SpiffeId.parse("spiffe://example.org/web")
    assert first == second and hash(first) == hash(second) and len({first, second}) == 1
    assert first != SpiffeId.parse("spiffe://example.org/Web")  # §2.4: "The path is case-sensitive"
    with pytest.raises(AttributeError):
        first.path = "/other"  # type: ignore[misc]


def test_non_strings_are_refused_not_crashed_on() -> None:
    for value in (None, 42, b"spiffe://example.org/web"):
        with pytest.raises(WorkloadError):
            SpiffeId.parse(value)  # type: ignore[arg-type]


def test_trust_domain_predicate() -> None:
    accept = accept_trust_domains(["example.org", "partner.org"])
    assert accept is not None and accept("example.org") and accept("partner.org")
    assert not accept("evil.org") and not accept("sub.example.org") and not accept("")
    assert accept_trust_domains([]) is None  # no list: any trust domain


def test_the_old_import_path_still_works() -> None:
    from authz_server.identity import workloads

    assert workloads.split_spiffe_id is split_spiffe_id
    assert workloads.accept_trust_domains is accept_trust_domains
