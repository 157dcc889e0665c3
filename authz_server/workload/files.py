"""State on disk: private directories, key files that are never readable by others, atomic writes."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..errors import ConfigError


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as 0700 when missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_private(path: Path) -> Any:
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key="state_dir") from None
    if info.st_mode & 0o077:
        raise ConfigError(f"{path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                          "chmod 600 it", key="state_dir")
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read private key {path}: {exc}", key="state_dir") from None
