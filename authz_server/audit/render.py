"""An audit record as one line of JSON: orjson, with the standard library where orjson refuses.

orjson renders a record in a few microseconds where ``json.dumps`` takes tens (it was a
quarter of a record's cost). The line means what ``json.dumps(document, separators=(",",
":"), default=str)`` wrote before, member for member and in the same order; only its
spelling of non-ASCII text differs (``é`` as UTF-8 where ``json.dumps`` wrote ``\\u00e9``), which every JSON
reader, PostgreSQL's ``jsonb`` and OPA's decision-log collectors read the same.

orjson refuses a few things the standard library writes: lone surrogates (a header value
decoded with ``surrogateescape``), integers beyond 64 bits, non-string keys. Those records,
rare by construction, are rendered by ``json.dumps`` exactly as before. One difference is
kept on purpose: a non-finite float is written ``null`` (``json.dumps`` wrote ``NaN``, which
is not JSON: PostgreSQL refused the whole batch).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# datetimes and dataclasses go through ``default`` (``str``), as ``json.dumps(default=str)`` has them.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def render_line(document: Any) -> str:
    """``document`` as one line of JSON (no spaces), as ``json.dumps(..., default=str)`` means it."""
    try:
        return orjson.dumps(document, default=str, option=_OPTIONS).decode("utf-8")
    except (TypeError, orjson.JSONEncodeError):  # surrogates, huge integers, keys orjson does not write
        return reference_line(document)


def reference_line(document: Any) -> str:
    """The standard library's rendering: what every record was before, and the fallback."""
    return json.dumps(document, separators=(",", ":"), default=str)
