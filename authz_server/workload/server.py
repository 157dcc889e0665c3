"""One Unix socket per registered workload, each a grpc.aio server with BOTH the SPIFFE Workload
API and Envoy SDS. The socket a caller connects to decides which workload it is: our local
stand-in for the SPIRE agent's workload attestation, so each socket is made owner-only (0600)
and its directory, when we create it, 0700.

``IdentityServer`` runs on the caller's event loop (``async with IdentityServer(config) as s``);
``IdentityServerThread`` runs one on its own loop in a background thread, for synchronous code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import stat
import threading
import time
from contextlib import closing
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Coroutine, Mapping, TypeVar

import grpc
from envoy.service.secret.v3 import sds_pb2_grpc
from spiffe._proto import workload_pb2_grpc

from ..errors import ConfigError
from .bundle import TrustBundle
from .bundle_endpoint import BundleFetcher, serve_bundle_endpoint
from .config import IdentityConfig
from .feed import WorkloadFeed
from .files import write_atomic
from .issuer import Changes, Issuer, WorkloadSnapshot
from .rotation import Rotator
from .sds import SecretDiscoveryServicer
from .workloadapi import WorkloadApiServicer

log = logging.getLogger(__name__)

T = TypeVar("T")


def _socket_in_use(path: Path) -> bool:
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _prepare_socket_path(path: Path, key: str) -> None:
    """Parent directory (0700 when created here); a stale socket from a crashed run is removed,
    a live one or any other kind of file is refused."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{path} exists and is not a socket", key=key)
    if _socket_in_use(path):
        raise ConfigError(f"{path} is being served by another process", key=key)
    path.unlink()


def _remove_stale_ready_file(path: Path) -> None:
    """A ready file left by a process that is gone would announce readiness too early."""
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
    except PermissionError:
        pass  # alive, someone else's


class IdentityServer:
    """The dev SPIFFE issuer: CAs, SVIDs, rotation, and a socket per workload."""

    def __init__(self, config: IdentityConfig, *, clock: Callable[[], float] = time.time,
                 grace: float = 0.5) -> None:
        self.config = config
        self._clock = clock
        self._grace = grace
        self._issuer: Issuer | None = None
        self._feeds: dict[str, WorkloadFeed] = {}
        self._servers: dict[str, grpc.aio.Server] = {}
        self._sds: dict[str, SecretDiscoveryServicer] = {}
        self._rotator: Rotator | None = None
        self._rotation_task: asyncio.Task[None] | None = None
        self._bound: list[Path] = []
        self._ready_file: Path | None = None
        self._endpoint: asyncio.Server | None = None
        self.bundle_endpoint_address = ""
        self.fetchers: dict[str, BundleFetcher] = {}
        self._fetch_tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load or create the CAs, issue every SVID, and serve every socket. Raises
        ``ConfigError`` (state or socket problems name the key) with nothing left behind."""
        if self.config.ready_file:
            _remove_stale_ready_file(Path(self.config.ready_file))
        self._issuer = Issuer(self.config, now=self._clock())
        try:
            for index, workload in enumerate(self.config.workloads):
                await self._serve(index, workload.name)
            self._rotator = Rotator(self._issuer, clock=self._clock, on_change=self._publish)
            self._rotation_task = asyncio.create_task(self._rotator.run(), name="identity-rotation")
            await self._start_federation()
            if self.config.ready_file:
                ready = Path(self.config.ready_file)
                ready.parent.mkdir(parents=True, exist_ok=True)
                state = {"pid": os.getpid(), "sockets": dict(self.sockets)}
                if self.bundle_endpoint_address:
                    state["bundle_endpoint"] = self.bundle_endpoint_address
                write_atomic(ready, (json.dumps(state) + "\n").encode(), mode=0o644)  # complete or not at all
                self._ready_file = ready
        except BaseException:
            await self.stop()
            raise

    async def _serve(self, index: int, name: str) -> None:
        assert self._issuer is not None
        workload = self._issuer.workloads[name]
        path = Path(workload.socket)
        _prepare_socket_path(path, f"workloads[{index}].socket")
        feed = WorkloadFeed(self._issuer, name, clock=self._clock)
        server = grpc.aio.server()
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(WorkloadApiServicer(feed), server)
        sds = SecretDiscoveryServicer(feed)
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(sds, server)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {path}: {exc}", key=f"workloads[{index}].socket") from None
        self._bound.append(path)
        os.chmod(path, 0o600)  # before start(): no connection is accepted while it is wider
        self._feeds[name], self._servers[name], self._sds[name] = feed, server, sds
        await server.start()
        log.info("workload %s (%s) served on %s", name, workload.spiffe_id, path)

    async def _start_federation(self) -> None:
        """Serve this issuer's bundles at the bundle endpoint, and fetch each remote partner's."""
        endpoint = self.config.bundle_endpoint
        if endpoint is not None:
            owned = {d.name for d in self.config.trust_domains}
            try:
                self._endpoint, self.bundle_endpoint_address = await serve_bundle_endpoint(
                    endpoint, lambda name: self.issuer.bundle(name) if name in owned else None)
            except OSError as exc:
                raise ConfigError(f"cannot serve the bundle endpoint on {endpoint.addr}: {exc}",
                                  key="bundle_endpoint.addr") from None
            except ssl.SSLError as exc:
                raise ConfigError(f"cannot use its certificate and key: {exc}", key="bundle_endpoint.cert_file") \
                    from None
            log.info("bundle endpoint https://%s/<trust domain> serving %s", self.bundle_endpoint_address,
                     ", ".join(sorted(owned)))
        for partner in self.config.remote_partners:
            fetcher = BundleFetcher(partner, lambda bundle: self._publish(self.issuer.federate(bundle)),
                                    default_refresh=self.config.bundle_refresh_hint)
            self.fetchers[partner.trust_domain] = fetcher
            self._fetch_tasks.append(asyncio.create_task(fetcher.run(), name=f"bundle-{partner.trust_domain}"))

    async def stop(self) -> None:
        """Stop rotating, end every stream, close every server, and remove the sockets."""
        for task in self._fetch_tasks:
            task.cancel()
        await asyncio.gather(*self._fetch_tasks, return_exceptions=True)
        self._fetch_tasks.clear()
        for fetcher in self.fetchers.values():
            await fetcher.close()
        self.fetchers.clear()
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        if self._rotation_task is not None:
            self._rotation_task.cancel()
            await asyncio.gather(self._rotation_task, return_exceptions=True)
            self._rotation_task = None
        for feed in self._feeds.values():
            feed.close()
        await asyncio.gather(*(s.stop(self._grace) for s in self._servers.values()), return_exceptions=True)
        self._servers.clear()
        for path in self._bound:
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            except FileNotFoundError:
                pass
        self._bound.clear()
        if self._ready_file is not None:  # only ours: a failed second instance leaves the first one's alone
            self._ready_file.unlink(missing_ok=True)
            self._ready_file = None

    async def __aenter__(self) -> "IdentityServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what it serves ------------------------------------------------------------------------

    @property
    def issuer(self) -> Issuer:
        if self._issuer is None:
            raise RuntimeError("the identity server is not started")
        return self._issuer

    @property
    def sockets(self) -> Mapping[str, str]:
        """Workload name → socket path."""
        return MappingProxyType({w.name: w.socket for w in self.config.workloads})

    def snapshot(self, workload: str) -> WorkloadSnapshot:
        """What ``workload`` is served right now (its SVID, bundle, federated bundles)."""
        return self.issuer.snapshot(workload)

    def bundle(self, trust_domain: str) -> TrustBundle:
        return self.issuer.bundle(trust_domain)

    def sds_streams(self, workload: str) -> int:
        """Open SDS streams on ``workload``'s socket (e.g. to see that an Envoy subscribed)."""
        return len(self._sds[workload].streams)

    # -- forced rotation -----------------------------------------------------------------------

    async def rotate_now(self, workload: str | None = None) -> int:
        """Re-issue the X.509-SVID of ``workload`` (default: every workload) now and push it on
        both APIs; returns how many SVIDs were re-issued. ``KeyError`` for an unknown name."""
        changes = self.issuer.rotate_svids(self._clock(), None if workload is None else [workload])
        self._publish(changes)
        return len(changes.workloads)

    async def rotate_ca(self, trust_domain: str, *, activate_after: float | None = None) -> None:
        """Publish a new CA for ``trust_domain`` now (pushed to every workload that trusts the
        domain); it signs, and the domain's SVIDs are re-issued by it, ``activate_after``
        seconds later (default ``ca_publish_ahead``). ``KeyError`` for an unknown domain."""
        changes = self.issuer.rotate_ca(trust_domain, self._clock(), activate_after=activate_after)
        self._publish(changes)

    def _publish(self, changes: Changes) -> None:
        for name in changes.workloads:
            feed = self._feeds.get(name)
            if feed is not None:
                feed.publish()
        if self._rotator is not None:
            self._rotator.wake()


class IdentityServerThread:
    """An ``IdentityServer`` on its own event loop in a daemon thread, for synchronous callers::

        with IdentityServerThread(config) as identity:
            identity.rotate_now("frontend")
    """

    def __init__(self, config: IdentityConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.server = IdentityServer(config, clock=clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> "IdentityServerThread":
        self._thread = threading.Thread(target=self._main, name="identity-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the identity server did not start within {timeout:.0f}s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.stop()

        asyncio.run(main())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        if self._loop is None:
            raise RuntimeError("not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def rotate_now(self, workload: str | None = None) -> int:
        return self.call(self.server.rotate_now(workload))

    def rotate_ca(self, trust_domain: str, *, activate_after: float | None = None) -> None:
        self.call(self.server.rotate_ca(trust_domain, activate_after=activate_after))

    def snapshot(self, workload: str) -> WorkloadSnapshot:
        async def go() -> WorkloadSnapshot:
            return self.server.snapshot(workload)
        return self.call(go())

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "IdentityServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
