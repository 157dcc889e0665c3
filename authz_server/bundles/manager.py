"""Bundles from the control plane to the policy that serves: the bundle ``PolicySet`` source.

Each configured bundle has a ``Downloader``. A download is read and verified
(``load_bundle``: tarball, signature, manifest, roots) off the event loop; the bundles that
serve together are then merged into one ``PolicySet`` and offered to the ``PolicyRuntime``,
which activates it only after the same gate as a folder reload (compile, the set's own
tests) and swaps it in with one assignment: no request is ever decided by part of a set.
Anything refused (a corrupt tarball, a bad signature, failing tests, overlapping roots)
leaves the last good set serving and is reported in the bundle's status; the downloader
keeps asking with the ETag of what serves, so a fixed bundle is taken as soon as it is
published.

Until every live bundle has a first candidate (downloaded, or persisted by an earlier run
with ``persist: true``) nothing is activated: a server with half its bundles would decide
with half its policy. With ``shadow.bundle`` one bundle is kept out of the live set and
feeds the shadow runtime instead (see ``authz_server.shadow``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Mapping

from ..tasks import cancel_all
from ..errors import PolicyError
from ..policy.loader import PolicyRuntime
from .bundle import Bundle, load_bundle, merge
from .config import BundleSource, ControlPlane
from .download import Download, Downloader
from .errors import BundleError
from .service import ServiceClient
from .status import BundleStatus

log = logging.getLogger("authz_server.bundles")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def persisted_path(directory: str, name: str) -> Path:
    """OPA's layout: ``<persistence_directory>/bundles/<name>/bundle.tar.gz``."""
    safe = name if _SAFE_NAME.match(name) and name not in (".", "..") else name.encode().hex()
    return Path(directory) / "bundles" / safe / "bundle.tar.gz"


def save_bundle(directory: str, bundle: Bundle) -> None:
    """Atomically replace the persisted copy (a crash leaves the old one or the new one)."""
    path = persisted_path(directory, bundle.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(bundle.raw)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class BundleManager:
    def __init__(self, plane: ControlPlane, runtime: PolicyRuntime, clients: Mapping[str, ServiceClient], *,
                 shadow_runtime: PolicyRuntime | None = None, on_status: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.plane = plane
        self.runtime = runtime
        self.shadow_runtime = shadow_runtime
        self.live_names = tuple(source.name for source in plane.live_bundles)
        shadow = plane.shadow_bundle
        self.shadow_name = shadow.name if shadow is not None else ""
        self.downloaders = {source.name: Downloader(source, clients[source.service], self._on_download)
                            for source in plane.bundles}
        self.status = {source.name: BundleStatus(source.name) for source in plane.bundles}
        self.serving: dict[str, Bundle] = {}  # the live bundles in the active set
        self.waiting: dict[str, tuple[Bundle, bool]] = {}  # first candidates (and persist?) until all are in
        self.on_status = on_status
        self._clock = clock
        self._lock = asyncio.Lock()  # one activation at a time: each builds on what serves
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return bool(self.serving) and set(self.serving) == set(self.live_names)

    async def start(self) -> None:
        """Activate what earlier runs persisted (before the server is even asked), then poll."""
        for source in self.plane.bundles:
            if source.persist:
                await self._load_persisted(source)
        for downloader in self.downloaders.values():
            self._tasks.append(asyncio.create_task(downloader.run(), name=f"bundle {downloader.source.name}"))

    async def stop(self) -> None:
        await cancel_all(self._tasks)

    def poll_now(self) -> None:
        for downloader in self.downloaders.values():
            downloader.wake.set()

    async def _load_persisted(self, source: BundleSource) -> None:
        path = persisted_path(self.plane.persistence_directory, source.name)
        try:
            raw = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("bundle %s: cannot read the persisted copy %s: %s", source.name, path, exc.strerror)
            return
        try:
            bundle = await asyncio.to_thread(load_bundle, source.name, raw, verification=source.verification,
                                             size_limit=source.size_limit)
        except PolicyError as exc:
            log.error("bundle %s: the persisted copy %s is refused (%s): %s", source.name, path, exc.code, exc.message)
            return
        log.info("bundle %s: starting from the persisted copy (revision %r)", source.name, bundle.revision)
        await self._take(source, bundle, persist=False)

    async def _on_download(self, source: BundleSource, download: Download) -> bool:
        status = self.status[source.name]
        now = self._clock()
        status.last_request = now
        if download.error is not None:
            status.failed(download.error.message, error_code=download.error.code,
                          http_code=getattr(download.error, "http_status", 0))
            log.warning("bundle %s: download failed: %s", source.name, download.error.message)
            self.on_status()
            return False
        status.last_successful_request = now
        if download.body is None:  # 304: the server has what serves here
            status.cleared()
            self.on_status()
            return True
        status.last_successful_download = now
        status.size = len(download.body)
        try:
            bundle = await asyncio.to_thread(load_bundle, source.name, download.body,
                                             verification=source.verification, size_limit=source.size_limit,
                                             etag=download.etag)
        except PolicyError as exc:
            self._refused(source, exc)
            return False
        return await self._take(source, bundle, persist=source.persist)

    async def _take(self, source: BundleSource, bundle: Bundle, *, persist: bool) -> bool:
        """Activate ``bundle`` with the others (or hold it until they are in); False if refused."""
        if source.name == self.shadow_name:
            return await self._offer_shadow(source, bundle, persist=persist)
        async with self._lock:
            self.waiting[source.name] = (bundle, persist)
            if not self.serving:
                missing = [name for name in self.live_names if name not in self.waiting]
                if missing:
                    log.info("bundle %s: revision %r ready; waiting for %s before serving", source.name,
                             bundle.revision, ", ".join(missing))
                    return True
            candidate = {**self.serving, **{name: entry[0] for name, entry in self.waiting.items()}}
            arrived = dict(self.waiting)
            self.waiting.clear()
            try:
                policy_set = merge([candidate[name] for name in self.live_names])
                if not await self.runtime.offer(policy_set,
                                                origin=f"bundle {source.name} (revision {bundle.revision!r})"):
                    raise PolicyError(self.runtime.status.last_error,
                                      code=self.runtime.status.last_error_code or "policy_error")
            except PolicyError as exc:
                # the others still wait for a good one of this bundle
                self.waiting = {name: entry for name, entry in arrived.items() if name != source.name}
                self._refused(source, exc)
                return False
            self.serving = candidate
        for name, (arrival, save) in arrived.items():
            self._activated(arrival, persist=save)
        return True

    async def _offer_shadow(self, source: BundleSource, bundle: Bundle, *, persist: bool) -> bool:
        assert self.shadow_runtime is not None
        try:
            policy_set = merge([bundle])
        except BundleError as exc:
            self._refused(source, exc)
            return False
        if await self.shadow_runtime.offer(policy_set, origin=f"shadow bundle {source.name} (revision "
                                                              f"{bundle.revision!r})"):
            self._activated(bundle, persist=persist)
            return True
        status = self.shadow_runtime.status
        self._refused(source, PolicyError(status.last_error, code=status.last_error_code or "policy_error"))
        return False

    def _activated(self, bundle: Bundle, *, persist: bool) -> None:
        status = self.status[bundle.name]
        status.cleared()
        status.active_revision = bundle.revision
        status.last_successful_activation = self._clock()
        if bundle.etag:
            self.downloaders[bundle.name].etag = bundle.etag
        log.info("bundle %s: revision %r activated%s", bundle.name, bundle.revision,
                 f" (ETag {bundle.etag})" if bundle.etag else "")
        if persist and bundle.raw:
            try:
                save_bundle(self.plane.persistence_directory, bundle)
            except OSError as exc:
                log.error("bundle %s: persisting failed: %s", bundle.name, exc)
                status.failed(f"persisting the bundle failed: {exc}", error_code="bundle_persist_failed")
        self.on_status()

    def _refused(self, source: BundleSource, error: PolicyError) -> None:
        status = self.status[source.name]
        repeated = status.message == error.message  # the same bundle again: said once already
        status.failed(error.message, error_code=error.code)
        serving = self.serving.get(source.name) if source.name != self.shadow_name else None
        log.log(logging.DEBUG if repeated else logging.ERROR, "bundle %s refused (%s): %s%s", source.name, error.code, error.message,
                  f"; revision {serving.revision!r} keeps serving" if serving is not None else "")
        self.on_status()
