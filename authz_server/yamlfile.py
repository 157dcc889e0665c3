"""Reading a YAML config file, with the same one-line errors for every config the CLI takes
(the server's, the dev issuer's, the dev IdP's)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def read_yaml_file(path: str | os.PathLike[str]) -> Any:
    """The file's YAML document (``{}`` for an empty file); ``ConfigError`` when it cannot be
    read or parsed, naming the line of a syntax error."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(file)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return {} if data is None else data
