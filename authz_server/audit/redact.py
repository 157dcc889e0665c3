"""Redaction: the one choke point every audit record passes before any sink sees it.

Two layers, both applied by ``Redactor.redact``:

1. **By place** (the OPA-Envoy input's known locations):
   - request headers (``input.attributes.request.http.headers`` and the raw ``headerMap``
     form): ``authorization`` and ``proxy-authorization`` keep only their scheme
     (``Bearer [REDACTED]``); ``cookie`` and ``set-cookie`` keep cookie names and attributes,
     never values; ``x-session-id`` and every header whose name contains ``token``,
     ``secret``, ``session``, ``password``, ``passwd``, ``api-key``, ``apikey`` or
     ``credential`` is replaced whole;
   - token-like query and form parameters (``TOKEN_PARAMETERS``) in ``http.path``,
     ``http.query``, the body, ``parsed_query`` and ``parsed_body``;
   - ``input.identity.session``: only ``id_sha256``, ``created``, ``expires`` and
     ``bound_to`` are kept; anything else there is erased;
   - header maps inside an object policy result (``headers``, ``response_headers_to_add``).
2. **By shape**, over every string of the record (odd headers, context extensions,
   metadata, messages): JWT/JWS/JWE-looking strings, ``Bearer``/``Basic``/``DPoP``/...
   credentials, ``name=value`` token parameters and ``"name": "value"`` JSON members.

The record is never modified in place (``decision.input`` is the document the policy
saw); the result is a new tree. JSON pointers (RFC 6901) of what was replaced are listed in
``masked`` and of what was removed in ``erased``, as OPA's decision logs do.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Sequence

from ..facts import Volatile

REDACTED = "[REDACTED]"

# Query, form and JSON member names whose values are credentials (RFC 6749, RFC 8693, OIDC).
# ``code`` is OAuth's authorization code (RFC 6749 § 4.1.2): the browser sign-in callback
# carries it in its query, and with the PKCE verifier it is worth a token until redeemed.
TOKEN_PARAMETERS = frozenset({
    "access_token", "id_token", "refresh_token", "token", "session", "session_id", "sessionid",
    "client_secret", "password", "passwd", "api_key", "apikey", "jwt", "assertion", "client_assertion",
    "subject_token", "actor_token", "code_verifier", "code",
})
_SCHEME_HEADERS = frozenset({"authorization", "proxy-authorization"})
_SECRET_HEADER_WORDS = ("token", "secret", "session", "password", "passwd", "api-key", "apikey", "credential")
_SESSION_KEYS = frozenset({"id_sha256", "created", "expires", "bound_to"})
_COOKIE_ATTRIBUTES = frozenset({"path", "domain", "expires", "max-age", "samesite", "priority"})
_FLAG_ATTRIBUTES = frozenset({"secure", "httponly", "partitioned"})
_RESULT_HEADER_KEYS = frozenset({"headers", "response_headers_to_add", "request_headers_to_add"})
# Record members the server writes itself from values no request controls (ids it made,
# times, the query path, its labels, the policy revision, booleans and codes): not scanned.
_OWN_MEMBERS = frozenset({"decision_id", "timestamp", "path", "labels", "bundles", "metrics", "allowed",
                          "http_status", "phase", "cached", "dry_run", "would_allow", "transport"})

_B64URL = r"[A-Za-z0-9_-]"
# A JOSE header is a base64url JSON object, so it starts with "ey" ('{' then '"', ' ', or a newline).
_JWT = re.compile(rf"ey{_B64URL}{{8,}}\.{_B64URL}*\.{_B64URL}*(?:\.{_B64URL}*\.{_B64URL}*)?")
_SCHEMES = ("bearer", "basic", "dpop", "negotiate", "ntlm", "mac")
_SCHEME_CREDENTIAL = re.compile(r"(?i)(?<![A-Za-z0-9])(" + "|".join(_SCHEMES) + r")(\s+)[A-Za-z0-9._~+/=:-]{8,}")
# name=value where the name starts the string or follows a separator; names are checked in
# code (an alternation of names under IGNORECASE is several times slower to scan).
_PARAMETER = re.compile(r"(?<![^?&;#\s])([A-Za-z0-9_.-]{1,64})=([^&#;\s]*)")
_PARAMETER_NEEDLES = re.compile("|".join(re.escape(f"{name}=") for name in sorted(TOKEN_PARAMETERS)))
_JSON_MEMBER = re.compile(r'"([A-Za-z_]{1,32})"(\s*:\s*)"(?:[^"\\]|\\.)*"')


def _parameter(match: re.Match[str]) -> str:
    if match.group(1).lower() in TOKEN_PARAMETERS and match.group(2):
        return f"{match.group(1)}={REDACTED}"
    return match.group(0)


def _json_member(match: re.Match[str]) -> str:
    if match.group(1).lower() in TOKEN_PARAMETERS:
        return f'"{match.group(1)}"{match.group(2)}"{REDACTED}"'
    return match.group(0)


def scrub_text(text: str) -> str:
    """Credentials recognised by their shape, wherever they are in ``text``. Only a string
    of 8 characters or more holding a '.', a space or tab, a '=' or a '"' can change: the C
    forms skip the call for any other (``scrub_cannot_change`` in _volatile_cut.c)."""
    if len(text) < 8:
        return text
    if "ey" in text and "." in text:
        text = _JWT.sub(REDACTED, text)
    if " " in text or "\t" in text:
        lowered = text.lower()
        if any(scheme in lowered for scheme in _SCHEMES):
            text = _SCHEME_CREDENTIAL.sub(rf"\1\2{REDACTED}", text)
    if "=" in text:
        # Only where a token parameter's "name=" is (a cheap test, exact: the names are
        # ASCII): ids and page numbers in every path were two Python callbacks a record.
        if _PARAMETER_NEEDLES.search(text.lower()) is not None:
            text = _PARAMETER.sub(_parameter, text)
    if '"' in text:
        text = _JSON_MEMBER.sub(_json_member, text)
    return text


def redact_scheme_value(value: str) -> str:
    """``Bearer eyJ...`` → ``Bearer [REDACTED]``: the scheme stays, for the auditor."""
    scheme, space, _ = value.strip().partition(" ")
    if space and scheme and all(c.isalnum() or c in "-_" for c in scheme):
        return f"{scheme} {REDACTED}"
    return REDACTED


def redact_cookie(value: str) -> str:
    """``a=1; b=2`` → ``a=[REDACTED]; b=[REDACTED]``."""
    parts = []
    for segment in value.split(";"):
        name, eq, _ = segment.strip().partition("=")
        if eq and name:
            parts.append(f"{name}={REDACTED}")
        elif name or eq:
            parts.append(REDACTED)  # a nameless cookie: the whole segment is its value
    return "; ".join(parts)


_SEPARATOR = re.compile(r"([;,])")
_DATE_TAIL = re.compile(r"\s*\d{1,2}[ -][A-Za-z]{3}[ -]\d{2,4} \d{2}:\d{2}:\d{2} GMT\s*")


def redact_set_cookie(value: str) -> str:
    """Cookie values go, attributes (after ';') stay. Envoy joins repeated headers with ',',
    so after a ',' comes either the rest of an ``Expires`` date or another cookie."""
    out: list[str] = []
    separator = ""
    for piece in _SEPARATOR.split(value):
        if piece in (";", ","):
            separator = piece
            out.append(piece)
            continue
        name, eq, _ = piece.strip().partition("=")
        lowered = name.lower()
        if separator == ";" and (lowered in _COOKIE_ATTRIBUTES if eq else lowered in _FLAG_ATTRIBUTES):
            out.append(piece)
        elif separator == "," and not eq and _DATE_TAIL.fullmatch(piece):
            out.append(piece)
        elif eq and name:
            out.append(f"{' ' if piece[:1].isspace() else ''}{name}={REDACTED}")
        elif piece.strip():
            out.append(REDACTED)
        else:
            out.append(piece)
    return "".join(out)


_SECRET_HEADER = re.compile("|".join(map(re.escape, _SECRET_HEADER_WORDS)))


def _secret_header(name: str) -> bool:
    return _SECRET_HEADER.search(name) is not None


def _whole(value: str) -> str:
    return REDACTED


@functools.lru_cache(maxsize=4096)
def header_rule(name: str) -> Callable[[str], str]:
    """How a header's value is redacted, which depends on its name alone: worked out once per
    name (a lowercase, three set lookups and a search per header per record were a third of
    a new request's header redaction)."""
    lowered = name.lower()
    if lowered in _SCHEME_HEADERS:
        return redact_scheme_value
    if lowered == "cookie":
        return redact_cookie
    if lowered == "set-cookie":
        return redact_set_cookie
    if _secret_header(lowered):
        return _whole
    return scrub_text


def redact_header(name: str, value: str) -> str:
    return header_rule(name)(value)


# Where a value sits, as a chain of (parent, key) pairs: a node costs one small tuple, and
# the JSON pointer is spelled out only for the few values that are actually redacted.
_Where = "tuple[Any, Any] | None"
_HTTP = ((((None, "input"), "attributes"), "request"), "http")  # input.attributes.request.http
_HEADERS = (_HTTP, "headers")
_PARSED_PATH = ((None, "input"), "parsed_path")
_PARSED_QUERY = ((None, "input"), "parsed_query")
_PARSED_BODY = ((None, "input"), "parsed_body")
_REQUEST_ID = (_HTTP, "id")

# A path as Envoy sends most: no escapes, no '+', '.', ';', '#', quotes or spaces, at most one
# '=' a query pair. ``scrub_text`` reacts only to '=', '"', whitespace and 'ey' before a '.',
# so the segments and query values parsed from such a path (pieces of it, between '/', '&'
# and '=') are never changed, and the path itself only where a query key is a token
# parameter (``_PARAMETER`` needs a whole key before an '='). Tested per record: one match.
_INERT_PATH = re.compile(r"[\w~/-]*(?:\?[\w~-]*(?:=[\w~-]*)?(?:&[\w~-]*(?:=[\w~-]*)?)*)?", re.ASCII)  # \w: [A-Za-z0-9_]


@functools.lru_cache(maxsize=4096)
def _pointer(where: Any) -> str:
    """RFC 6901: ``~`` is written ``~0`` and ``/`` is written ``~1`` inside a reference token."""
    parts: list[str] = []
    while where is not None:
        where, key = where
        parts.append(str(key))
    parts.reverse()
    joined = "/".join(parts)
    if "~" in joined or joined.count("/") != len(parts) - 1:
        joined = "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)
    return "/" + joined


@functools.lru_cache(maxsize=4096)
def header_pointer(name: str) -> str:
    """``_pointer`` of a request header: keyed on the name alone (hashing the chain of tuples
    of ``_HEADERS`` again on each call was most of a masked header's cost)."""
    return _pointer((_HEADERS, name))


def _is_mapping(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


class _Pass:
    """One redaction of one record: collects what was masked and erased."""

    __slots__ = ("masked", "erased")

    def __init__(self) -> None:
        self.masked: list[str] = []
        self.erased: list[str] = []

    def text(self, value: str, where: Any, rule: Callable[[str], str] = scrub_text) -> str:
        redacted = rule(value)
        if redacted != value:
            self.masked.append(_pointer(where))
        return redacted

    def any(self, value: Any, where: Any) -> Any:
        kind = type(value)
        if kind is str:
            if len(value) < 8:  # too short to hold anything scrub_text recognises
                return value
            redacted = scrub_text(value)
            if redacted is not value and redacted != value:
                self.masked.append(_pointer(where))
            return redacted
        if kind is dict:
            # Leaves inline: most members are short strings and numbers, and a call plus a
            # (where, key) tuple per leaf was a third of a new request's redaction.
            out = {}
            for k, v in value.items():
                leaf = type(v)
                if leaf is str:
                    if len(v) >= 8:
                        redacted = scrub_text(v)
                        if redacted is not v and redacted != v:
                            self.masked.append(_pointer((where, k)))
                        v = redacted
                    out[k] = v
                elif leaf is int or leaf is bool or v is None:
                    out[k] = v
                else:
                    out[k] = self.any(v, (where, k))
            return out
        if kind is list:
            walk = self.any
            return [walk(v, (where, i)) for i, v in enumerate(value)]
        if kind in (int, float, bool) or value is None:
            return value
        if isinstance(value, Mapping):
            return self.any(dict(value), where)
        if isinstance(value, (list, tuple)):
            return self.any(list(value), where)
        if isinstance(value, str):
            return self.any(str(value), where)
        return value

    def params(self, value: Any, where: Any) -> Any:
        """``parsed_query``/``parsed_body``: token-named members replaced at any depth."""
        if _is_mapping(value):
            out = {}
            for key, item in value.items():
                if isinstance(key, str) and key.lower() in TOKEN_PARAMETERS:
                    out[key] = [REDACTED] * len(item) if isinstance(item, list) and item else REDACTED
                    self.masked.append(_pointer((where, key)))
                else:
                    out[key] = self.params(item, (where, key))
            return out
        if isinstance(value, list):
            return [self.params(v, (where, i)) for i, v in enumerate(value)]
        return self.any(value, where)

    def headers(self, value: Any, where: Any) -> Any:
        if not _is_mapping(value):
            return self.any(value, where)
        out = {}
        for name, item in value.items():
            if type(item) is str:
                redacted = header_rule(name)(item)
                if redacted != item:
                    self.masked.append(_pointer((where, name)))
                out[name] = redacted
            else:
                out[name] = self.any(item, (where, name))
        return out

    def header_map(self, value: Any, where: Any) -> Any:
        """Envoy's raw form: ``{"headers": [{"key", "value" | "rawValue" (base64)}]}``."""
        entries = value.get("headers") if _is_mapping(value) else None
        if not isinstance(entries, list):
            return self.any(value, where)
        out_entries = []
        for index, entry in enumerate(entries):
            at = ((where, "headers"), index)
            if not _is_mapping(entry):
                out_entries.append(self.any(entry, at))
                continue
            name = str(entry.get("key", ""))
            item = {k: (v if k in ("value", "rawValue") else self.any(v, (at, k))) for k, v in entry.items()}
            rule = header_rule(name)
            if isinstance(item.get("value"), str):
                item["value"] = self.text(item["value"], (at, "value"), rule)
            if isinstance(item.get("rawValue"), str):
                item["rawValue"] = self.text(item["rawValue"], (at, "rawValue"), _through_base64(rule))
            out_entries.append(item)
        return {**{k: self.any(v, (where, k)) for k, v in value.items() if k != "headers"}, "headers": out_entries}

    def http(self, value: Any, where: Any) -> Any:
        if not _is_mapping(value):
            return self.any(value, where)
        out = {}
        for key, item in value.items():
            at = (where, key)
            if key == "headers":
                out[key] = self.headers(item, at)
            elif key == "headerMap":
                out[key] = self.header_map(item, at)
            elif key == "rawBody" and isinstance(item, str):
                out[key] = self.text(item, at, _through_base64(scrub_text))
            else:
                out[key] = self.any(item, at)
        return out

    def attributes(self, value: Any, where: Any) -> Any:
        if not _is_mapping(value):
            return self.any(value, where)
        out = {}
        for key, item in value.items():
            at = (where, key)
            if key == "request" and _is_mapping(item):
                out[key] = {k: self.http(v, (at, k)) if k == "http" else self.any(v, (at, k))
                            for k, v in item.items()}
            else:
                out[key] = self.any(item, at)
        return out

    def session(self, value: Any, where: Any) -> Any:
        if not _is_mapping(value):
            return self.any(value, where)
        out = {}
        for key, item in value.items():
            if key in _SESSION_KEYS:
                out[key] = self.any(item, (where, key))
            else:
                self.erased.append(_pointer((where, key)))
        return out

    def input(self, document: Any, clean: frozenset[str] = frozenset()) -> Any:
        root = (None, "input")
        if not _is_mapping(document):
            return self.any(document, root)
        out = {}
        for key, item in document.items():
            at = (root, key)
            if key in clean:
                out[key] = item
            elif key == "attributes":
                out[key] = self.attributes(item, at)
            elif key in ("parsed_query", "parsed_body"):
                out[key] = self.params(item, at)
            elif key == "identity" and _is_mapping(item):
                out[key] = {k: self.session(v, (at, k)) if k == "session" else self.any(v, (at, k))
                            for k, v in item.items()}
            else:
                out[key] = self.any(item, at)
        return out

    def result(self, value: Any) -> Any:
        root = (None, "result")
        if not _is_mapping(value):
            return self.any(value, root)
        return {k: self.headers(v, (root, k)) if k in _RESULT_HEADER_KEYS else self.any(v, (root, k))
                for k, v in value.items()}


def _through_base64(rule: Callable[[str], str]) -> Callable[[str], str]:
    def apply(encoded: str) -> str:
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return scrub_text(encoded)
        text = raw.decode("utf-8", "surrogateescape")
        redacted = rule(text)
        if redacted == text:
            return encoded
        return base64.b64encode(redacted.encode("utf-8", "surrogateescape")).decode("ascii")
    return apply


def _redact_headers(headers: Mapping[str, str], path: str, redacted_path: str, rule_of: Callable[[str], Any],
                    scrub: Callable[[str], str]) -> tuple[dict[str, str], list[str]]:
    """``Redactor.redact_request``'s headers: each value through its name's rule (``rule_of``),
    a value equal to the path the path as redacted already; and the names whose value changed,
    in the headers' order. ``_volatile_cut.redact_headers`` does the same in C, with the same
    arguments, and gives up (None) on a name or value that is not a ``str``."""
    out_headers = {}
    changed = []
    for name in headers:  # a protobuf map iterates its keys fastest
        value = headers[name]
        rule = rule_of(name)
        if rule is not scrub:
            redacted = rule(value)
        elif len(value) < 8:  # too short for anything scrub_text recognises
            out_headers[name] = value
            continue
        else:
            redacted = redacted_path if value == path else scrub(value)
        if redacted != value:
            changed.append(name)
        out_headers[name] = redacted
    return out_headers, changed


# the C loop when the extension was built (None when it gives up: the Python one then does it)
redact_headers: Callable[..., tuple[dict[str, str], list[str]] | None] = _redact_headers
_render_inert: Callable[..., tuple[bytes, bytes, bytes, bytes, bytes, list[str]] | None] | None = None
try:
    from .. import _volatile_cut
except ImportError:  # built without a C compiler
    pass
else:
    redact_headers = _volatile_cut.redact_headers
    _render_inert = _volatile_cut.render_inert_request


def render_inert_request(method: str, path: str,
                         headers: Mapping[str, str]) -> tuple[tuple[bytes, ...], tuple[str, ...]] | None:
    """``Redactor.redact_request``'s members rendered (orjson's bytes), in C, for the usual request
    of traffic that does not repeat: a path ``_INERT_PATH`` matches with no query name in
    ``TOKEN_PARAMETERS``, a method shorter than 8 characters, string headers. Redaction then
    changes nothing but header values (by the same rules, ``header_rule`` and ``scrub_text``),
    and the path's parse has nothing to unescape. ((headers, method, path, parsed_path,
    parsed_query), masked); None for any other request, or without the extension: then
    ``redact_request`` and orjson make it, the same (tests/unit/test_audit_redact.py)."""
    if _render_inert is None:
        return None
    done = _render_inert(method, path, headers, header_rule, scrub_text, TOKEN_PARAMETERS)
    if done is None:
        return None
    *rendered, changed = done
    return tuple(rendered), tuple(map(header_pointer, changed))


class Redacted(NamedTuple):
    """Members of an input document as ``Redactor.redact`` would leave them, and where it
    masked and erased (JSON pointers into the record). A named tuple: one is made for every
    request that does not repeat, and a frozen dataclass's ``__init__`` costs more than twice
    as much (2.0 against 0.8 µs, timeit, 5 fields)."""

    members: Mapping[str, Any]
    masked: tuple[str, ...] = ()
    erased: tuple[str, ...] = ()


class Redactor:
    """``redact(record)`` → a new record with secrets replaced and ``masked``/``erased``
    listing where. The record is the OPA decision-log shape (``input``, ``result``, ...)."""

    def redact(self, record: Mapping[str, Any], *, clean: Sequence[Redacted] = ()) -> dict[str, Any]:
        """``clean``: members of ``record["input"]`` that are redacted already (by
        ``redact_input_parts``, ``redact_volatile``); they are taken as they are."""
        run = _Pass()
        clean_members: frozenset[str] = frozenset()
        for part in clean:
            clean_members |= part.members.keys()
            run.masked.extend(part.masked)
            run.erased.extend(part.erased)
        out: dict[str, Any] = {}
        for key, value in record.items():
            if key == "input":
                out[key] = run.input(value, clean_members)
            elif key == "result":
                out[key] = run.result(value)
            elif key in ("masked", "erased"):
                continue
            elif key in _OWN_MEMBERS:
                out[key] = value
            else:
                out[key] = run.any(value, (None, key))
        if run.erased:
            out["erased"] = run.erased
        if run.masked:
            out["masked"] = run.masked
        return out

    def redact_input_parts(self, parts: Mapping[str, Any]) -> Redacted:
        """Members of an input document, redacted as ``redact`` would."""
        run = _Pass()
        return Redacted(run.input(parts), tuple(run.masked), tuple(run.erased))

    def redact_member(self, name: str, value: Any) -> tuple[Any, list[str], list[str]]:
        """One top-level member of a record (not ``input``), redacted as ``redact`` would:
        (value, masked, erased)."""
        run = _Pass()
        if name == "result":
            out = run.result(value)
        elif name in _OWN_MEMBERS:
            out = value
        else:
            out = run.any(value, (None, name))
        return out, run.masked, run.erased

    def redact_request(self, method: str, path: str, headers: Mapping[str, str], parsed_path: list[str],
                       parsed_query: dict[str, list[str]], parsed_body: Any, *, path_first: bool = False) -> Redacted:
        """What changes from request to request of one shape, redacted as ``redact`` would
        where it is: ``input.attributes.request.http``'s ``method``, ``headers`` (string values:
        what both fronts give) and ``path``, and the input's ``parsed_path``/``parsed_query`` (as
        ``facts.parse_path_and_query`` makes them: strings in a list, lists of strings by name)
        and ``parsed_body`` (any shape: the whole walk). The walk's rules, unrolled for those
        types: this runs once for every request that does not repeat. ``path_first``: the
        attributes list the path before the headers (``masked`` lists them in walk order)."""
        run = _Pass()
        masked = run.masked
        if len(method) >= 8:
            method = run.text(method, (_HTTP, "method"))
        inert = _INERT_PATH.fullmatch(path) is not None and TOKEN_PARAMETERS.isdisjoint(map(str.lower, parsed_query))
        # once: the gRPC front has it again in the :path header
        redacted_path = path if inert else scrub_text(path)
        if path_first and redacted_path != path:
            masked.append(_pointer((_HTTP, "path")))
        done = redact_headers(headers, path, redacted_path, header_rule, scrub_text)
        if done is None:
            done = _redact_headers(headers, path, redacted_path, header_rule, scrub_text)
        out_headers, changed = done
        if changed:
            masked.extend(map(header_pointer, changed))
        if not path_first and redacted_path != path:
            masked.append(_pointer((_HTTP, "path")))
        path = redacted_path
        if inert:  # nothing in them that redaction changes: taken as they are (nothing changes them later)
            out_path, out_query = parsed_path, parsed_query
        else:
            out_path, out_query = self._parsed(parsed_path, parsed_query, run)
        if parsed_body is not None:
            parsed_body = run.params(parsed_body, _PARSED_BODY)
        return Redacted({"method": method, "headers": out_headers, "path": path, "parsed_path": out_path,
                         "parsed_query": out_query, "parsed_body": parsed_body}, tuple(masked), tuple(run.erased))

    @staticmethod
    def _parsed(parsed_path: list[str], parsed_query: dict[str, list[str]],
                run: _Pass) -> tuple[list[str], dict[str, Any]]:
        masked = run.masked
        out_path = []
        for index, segment in enumerate(parsed_path):
            if len(segment) >= 8:
                segment = run.text(segment, (_PARSED_PATH, index))
            out_path.append(segment)
        out_query: dict[str, Any] = {}
        for key, values in parsed_query.items():
            if key.lower() in TOKEN_PARAMETERS:
                out_query[key] = [REDACTED] * len(values) if values else REDACTED
                masked.append(_pointer((_PARSED_QUERY, key)))
            else:
                at = (_PARSED_QUERY, key)
                out_query[key] = [run.text(value, (at, index)) if len(value) >= 8 else value
                                  for index, value in enumerate(values)]
        return out_path, out_query

    def redact_volatile(self, value: Volatile) -> tuple[Volatile, tuple[str, ...]]:
        """The per-request attribute values redacted, and where they were masked: ``value``
        itself when nothing was (a request id and tracing headers seldom hold a secret), so
        a record makes no new objects for them."""
        request_id, headers = value.request_id, value.headers
        masked: list[str] = []
        if type(request_id) is not str:  # a front's bug: walked as any value is
            run = _Pass()
            request_id = run.any(request_id, _REQUEST_ID)
            masked = run.masked
        elif len(request_id) >= 8:  # as _Pass.any: shorter holds nothing scrub_text recognises
            redacted_id = scrub_text(request_id)
            if redacted_id != request_id:
                masked.append(_pointer(_REQUEST_ID))
                request_id = redacted_id
        # a plain dict, as the record renders them
        redacted_headers = None if type(headers) is dict else dict(headers)
        for name in headers:
            item = headers[name]
            redacted = header_rule(name)(item)
            if redacted != item:
                masked.append(header_pointer(name))
                if redacted_headers is None:
                    redacted_headers = dict(headers)
                redacted_headers[name] = redacted
        if not masked and redacted_headers is None:
            return value, ()
        return Volatile(request_id=request_id, time_value=value.time_value, port=value.port,
                        headers=redacted_headers if redacted_headers is not None else headers), tuple(masked)
