"""Read a policy result strictly, as OPA-Envoy's ``envoyauth/response.go`` does.

A result is either a boolean or an object with a boolean ``allowed`` and optional
``headers``, ``response_headers_to_add``, ``request_headers_to_remove``, ``http_status``,
``body``, ``dynamic_metadata``, ``query_parameters_to_set`` and
``query_parameters_to_remove``. Our one addition: an optional ``reason``, a short
``snake_case`` code for why (``rate_limited``, ``threat_listed``…) that becomes the
decision's code in the audit log, the metrics and the denied body. OPA-Envoy ignores
unknown keys, so a policy that sets it still runs there. Anything else is not a decision: each accessor checks
its field and a bad one raises ``PolicyError(code="policy_result_invalid")``, which the
pipeline turns into a deny.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import PolicyError

Headers = tuple[tuple[str, str], ...]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Envoy validates HttpStatus.code against its enum (envoy.type.v3.StatusCode, from 200 up):
# anything else would make Envoy drop our answer. Written out so the core imports no protobuf;
# tests/unit/test_response.py holds it equal to the enum.
VALID_STATUS = frozenset({
    200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
    300, 301, 302, 303, 304, 305, 307, 308,
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421, 422, 423,
    424, 426, 428, 429, 431,
    500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
})


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy decided, in plain values."""

    allowed: bool
    http_status: int = 403  # for a deny; an allow always answers 200 upstream
    headers: Headers = ()  # allow: added to the upstream request; deny: sent to the client
    response_headers_to_add: Headers = ()  # allow only: added to the client's response
    request_headers_to_remove: tuple[str, ...] = ()
    body: str = ""
    dynamic_metadata: Mapping[str, Any] | None = None
    query_parameters_to_set: Headers = ()
    query_parameters_to_remove: tuple[str, ...] = ()
    reason: str = ""  # the policy's own code for this decision, if it gave one


# A policy answering true or false: one verdict each, shared (frozen), not one per cached answer.
_BARE_VERDICTS = {True: Verdict(allowed=True), False: Verdict(allowed=False)}

_REASON = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _invalid(message: str) -> PolicyError:
    return PolicyError(message, code="policy_result_invalid")


def read_result(result: Any) -> Verdict:
    """Turn the value of the policy query into a ``Verdict``."""
    if isinstance(result, bool):
        return _BARE_VERDICTS[result]
    if not isinstance(result, dict):
        raise _invalid(f"illegal value for policy evaluation result: {type(result).__name__}")
    if "allowed" not in result:
        raise _invalid('unable to determine evaluation result due to missing "allowed" key')
    allowed = result["allowed"]
    if not isinstance(allowed, bool):
        raise _invalid(f"expected allowed to be a boolean, got {type(allowed).__name__}")
    return Verdict(
        allowed=allowed,
        http_status=_http_status(result),
        headers=_headers(result, "headers"),
        response_headers_to_add=_headers(result, "response_headers_to_add"),
        request_headers_to_remove=_strings(result, "request_headers_to_remove"),
        body=_body(result),
        dynamic_metadata=_dynamic_metadata(result),
        query_parameters_to_set=_query_parameters_to_set(result),
        query_parameters_to_remove=_strings(result, "query_parameters_to_remove"),
        reason=_reason(result),
    )


def _reason(result: dict[str, Any]) -> str:
    value = result.get("reason", "")
    if not isinstance(value, str) or (value and not _REASON.match(value)):
        raise _invalid(f"reason must be a short snake_case code, got {value!r}")
    return value


def _http_status(result: dict[str, Any]) -> int:
    value = result.get("http_status", 403)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise _invalid(f"expected http_status to be an integer, got {value!r}")
    status = int(value)
    if status not in VALID_STATUS:
        raise _invalid(f"invalid HTTP status code {status}")
    return status


def _header_pair(name: Any, value: Any, field_name: str) -> tuple[str, str]:
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise _invalid(f"{field_name}: invalid header name {name!r}")
    if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
        raise _invalid(f"{field_name}: invalid value for header {name!r}")
    return name, value


def _headers(result: dict[str, Any], field_name: str) -> Headers:
    value = result.get(field_name)
    if value is None:
        return ()
    maps = value if isinstance(value, list) else [value]
    pairs: list[tuple[str, str]] = []
    for mapping in maps:
        if not isinstance(mapping, dict):
            raise _invalid(f"expected {field_name} to be an object, got {type(mapping).__name__}")
        for name, item in mapping.items():
            for one in item if isinstance(item, list) else [item]:
                pairs.append(_header_pair(name, one, field_name))
    return tuple(pairs)


def _strings(result: dict[str, Any], field_name: str) -> tuple[str, ...]:
    value = result.get(field_name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"expected {field_name} to be an array of strings")
    return tuple(value)


def _body(result: dict[str, Any]) -> str:
    value = result.get("body", "")
    if not isinstance(value, str):
        raise _invalid(f"expected body to be a string, got {type(value).__name__}")
    return value


def _dynamic_metadata(result: dict[str, Any]) -> Mapping[str, Any] | None:
    value = result.get("dynamic_metadata")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"expected dynamic_metadata to be an object, got {type(value).__name__}")
    return value


def _query_parameters_to_set(result: dict[str, Any]) -> Headers:
    value = result.get("query_parameters_to_set")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _invalid("expected query_parameters_to_set to be an object")
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        for one in item if isinstance(item, list) else [item]:
            if not isinstance(one, str):
                raise _invalid(f"query_parameters_to_set: value for {key!r} must be a string or array of strings")
            pairs.append((key, one))
    return tuple(pairs)
