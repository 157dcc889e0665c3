"""A small control plane for tests and the demo: bundles, decision logs and status over HTTP.

Served with aiohttp. It speaks the three OPA APIs the server uses:
- ``GET /bundles/<name>`` (or any path under the folder) → ``<name>.tar.gz`` from the folder,
  or the folder ``<name>/`` built into a bundle on the fly; a strong ``ETag`` (SHA-256 of the
  bytes); ``If-None-Match`` → 304; with ``Prefer: wait=N`` a request whose ETag is current is
  held until the bundle changes or N seconds pass (long polling, announced by answering
  ``Content-Type: application/vnd.openpolicyagent.bundles``).
- ``POST /logs[/...]``: gzip JSON arrays of decision events, kept in memory (and appended to
  ``--logs-file`` as JSON lines); ``GET /logs`` lists them.
- ``POST /status[/...]``: status reports; ``GET /status`` gives the latest per instance id.

Fault mode (``--fault`` or ``POST /_faults``) for tests: ``slow`` (answer after ``delay``
seconds), ``error`` (answer ``status``, 500 by default), ``truncate`` (announce the whole
bundle, send half of it, close), ``down`` (close the connection without an answer), each for
paths under ``prefix`` (default: all). ``--token`` requires ``Authorization: Bearer <token>``;
``--tls-cert``/``--tls-key`` serve HTTPS and ``--client-ca`` requires client certificates.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .archive import write_tarball
from .download import LONG_POLL_CONTENT_TYPE

log = logging.getLogger("authz_server.bundles.server")

MAX_EVENTS = 100_000


@dataclass
class Faults:
    mode: str = "none"  # none | slow | error | truncate | down
    delay: float = 1.0
    status: int = 500
    prefix: str = "/"

    @classmethod
    def parse(cls, text: str) -> "Faults":
        """``slow:2``, ``error:503``, ``truncate``, ``down``, optionally ``@/bundles`` for a prefix."""
        spec, _, prefix = text.partition("@")
        mode, _, arg = spec.partition(":")
        faults = cls(mode=mode or "none", prefix=prefix or "/")
        if faults.mode not in ("none", "slow", "error", "truncate", "down"):
            raise ValueError(f"unknown fault mode {mode!r}: none, slow[:SECONDS], error[:STATUS], truncate, down")
        if arg and faults.mode == "slow":
            faults.delay = float(arg)
        elif arg and faults.mode == "error":
            faults.status = int(arg)
        return faults

    def applies(self, path: str) -> bool:
        return self.mode != "none" and path.startswith(self.prefix)


@dataclass
class Published:
    raw: bytes
    etag: str


def _etag(raw: bytes) -> str:
    return '"' + hashlib.sha256(raw).hexdigest()[:32] + '"'


def _folder_files(folder: Path) -> list[tuple[str, bytes]]:
    return [(path.relative_to(folder).as_posix(), path.read_bytes())
            for path in sorted(folder.rglob("*")) if path.is_file()]


@dataclass
class ControlPlaneServer:
    """The app's state; ``app()`` gives the aiohttp application."""

    root: Path | None = None  # folder of NAME.tar.gz files and NAME/ bundle folders
    token: str = ""
    faults: Faults = field(default_factory=Faults)
    logs_file: Path | None = None
    watch_interval: float = 0.2
    long_polling: bool = True  # False: answer application/gzip and never hold a request
    events: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, path, headers (lower)
    _published: dict[str, Published] = field(default_factory=dict)
    _changed: asyncio.Condition | None = None
    _disk: dict[str, tuple[Any, Published]] = field(default_factory=dict)

    # -- publishing
    def publish(self, name: str, raw: bytes) -> str:
        """Serve ``raw`` as bundle ``name`` (from now on, over what the folder holds)."""
        published = Published(raw, _etag(raw))
        self._published[name] = published
        self._notify()
        return published.etag

    def _notify(self) -> None:
        if self._changed is not None:
            condition = self._changed

            async def wake() -> None:
                async with condition:
                    condition.notify_all()

            asyncio.get_running_loop().create_task(wake())

    def bundle(self, name: str) -> Published | None:
        if name in self._published:
            return self._published[name]
        if self.root is None:
            return None
        archive, folder = self.root / f"{name}.tar.gz", self.root / name
        try:
            if archive.is_file():
                stat = archive.stat()
                key: Any = ("file", stat.st_mtime_ns, stat.st_size)
                cached = self._disk.get(name)
                if cached is None or cached[0] != key:
                    raw = archive.read_bytes()
                    cached = (key, Published(raw, _etag(raw)))
                    self._disk[name] = cached
                return cached[1]
            if folder.is_dir():
                key = ("dir", tuple((p.as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                                    for p in sorted(folder.rglob("*")) if p.is_file()))
                cached = self._disk.get(name)
                if cached is None or cached[0] != key:
                    raw = write_tarball(_folder_files(folder))
                    cached = (key, Published(raw, _etag(raw)))
                    self._disk[name] = cached
                return cached[1]
        except OSError:
            return None
        return None

    # -- the app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/_faults", self._set_faults)
        app.router.add_post("/logs{tail:.*}", self._post_logs)
        app.router.add_get("/logs", self._get_logs)
        app.router.add_post("/status{tail:.*}", self._post_status)
        app.router.add_get("/status", self._get_status)
        app.router.add_get("/{path:.+}", self._get_bundle)
        app.on_startup.append(self._started)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _started(self, _app: web.Application) -> None:
        self._changed = asyncio.Condition()
        self._watcher = asyncio.create_task(self._watch())

    async def _cleanup(self, _app: web.Application) -> None:
        self._watcher.cancel()

    async def _watch(self) -> None:
        """Wakes long polls when a file in the folder changes."""
        seen: dict[str, str] = {}
        while True:
            await asyncio.sleep(self.watch_interval)
            if self.root is None or not self.root.is_dir():
                continue
            names = {p.name[:-7] for p in self.root.glob("*.tar.gz")} | {p.name for p in self.root.iterdir()
                                                                          if p.is_dir()}
            current = {}
            for name in names:
                published = await asyncio.to_thread(self.bundle, name)
                if published is not None:
                    current[name] = published.etag
            if current != seen:
                seen = current
                self._notify()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path, {k.lower(): v for k, v in request.headers.items()}))
        if request.path != "/_faults":
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.Response(status=401, text="unauthorized\n")
            faults = self.faults
            if faults.applies(request.path):
                if faults.mode == "slow":
                    await asyncio.sleep(faults.delay)
                elif faults.mode == "error":
                    return web.Response(status=faults.status, text="fault injected\n")
                elif faults.mode == "down":
                    if request.transport is not None:
                        request.transport.close()
                    raise ConnectionResetError("fault injected: connection closed")
        return await handler(request)

    async def _set_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            self.faults = Faults.parse(str(body.get("fault", "none")))
        except ValueError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        return web.json_response({"fault": self.faults.mode})

    async def _get_bundle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"].removeprefix("bundles/")
        published = self.bundle(name)
        if published is None:
            return web.Response(status=404, text=f"no bundle {name!r}\n")
        wait = _prefer_wait(request.headers.get("Prefer", "")) if self.long_polling else 0.0
        if wait and request.headers.get("If-None-Match") == published.etag and self._changed is not None:
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait_for(
                        lambda: (self.bundle(name) or published).etag != published.etag), wait)
            except TimeoutError:
                pass
            published = self.bundle(name) or published
        content_type = LONG_POLL_CONTENT_TYPE if self.long_polling else "application/gzip"
        headers = {"ETag": published.etag, "Content-Type": content_type}
        if request.headers.get("If-None-Match") == published.etag:
            return web.Response(status=304, headers=headers)
        if self.faults.mode == "truncate" and self.faults.applies(request.path):
            response = web.StreamResponse(status=200, headers={**headers,
                                                               "Content-Length": str(len(published.raw))})
            await response.prepare(request)
            await response.write(published.raw[: len(published.raw) // 2])
            if request.transport is not None:
                request.transport.close()
            return response
        return web.Response(status=200, body=published.raw, headers=headers)

    async def _post_logs(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            if raw[:2] == b"\x1f\x8b":  # aiohttp has usually undone Content-Encoding: gzip already
                raw = gzip.decompress(raw)
            events = json.loads(raw)
        except (OSError, EOFError, ValueError) as exc:
            return web.Response(status=400, text=f"cannot read the events: {exc}\n")
        if not isinstance(events, list):
            return web.Response(status=400, text="expected a JSON array of events\n")
        self.events.extend(events)
        del self.events[:-MAX_EVENTS]
        if self.logs_file is not None:
            with self.logs_file.open("a") as handle:
                for event in events:
                    handle.write(json.dumps(event, separators=(",", ":")) + "\n")
        return web.Response(status=204)

    async def _get_logs(self, _request: web.Request) -> web.Response:
        return web.json_response(self.events)

    async def _post_status(self, request: web.Request) -> web.Response:
        try:
            report = await request.json()
        except ValueError as exc:
            return web.Response(status=400, text=f"cannot read the status: {exc}\n")
        instance = str((report.get("labels") or {}).get("id", "")) if isinstance(report, dict) else ""
        self.statuses[instance] = report
        return web.Response(status=200)

    async def _get_status(self, _request: web.Request) -> web.Response:
        return web.json_response(self.statuses)


def _prefer_wait(prefer: str) -> float:
    for part in prefer.replace(",", ";").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "wait" and value.strip().isdigit():
            return float(value.strip())
    return 0.0


async def start_server(state: ControlPlaneServer, addr: str = "127.0.0.1:0", *,
                       ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, str]:
    """Start serving; returns the runner (``await runner.cleanup()`` stops it) and the bound
    ``host:port``."""
    host, _, port = addr.rpartition(":")
    runner = web.AppRunner(state.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host or "127.0.0.1", int(port or 0), ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0]
    return runner, f"{bound[0]}:{bound[1]}"
