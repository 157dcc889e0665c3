"""``authz-server demo``: bring up real processes on this machine and walk through them.

By default the zero-trust mesh (``launcher.py``: three services behind Envoy sidecars with
SVIDs, authz-server, the dev SPIFFE issuer and the dev OIDC provider) and its tour
(``meshtour.py``). ``--quickstart``: authz-server, a small upstream and one Envoy running the
OPA-Envoy tutorial policy unchanged. Either way a scripted tour of allowed and denied
requests, each explained. ``--keep`` leaves everything running and prints commands to try
by hand; Ctrl-C stops every process the demo started.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import httpx
import jwt
import jwt.warnings

from .envoy import start_envoy
from .extauthz import AuthzTarget
from .front import FrontProxy, Route, render_front_proxy
from .processes import Supervisor, free_port, tcp_ready, wait_until
from .tour import Outcome, Step, TourResult, expect_status, run_tour

if TYPE_CHECKING:
    from .launcher import MeshOptions

QUICKSTART_POLICIES = Path(__file__).parent / "policies" / "quickstart"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="store_true", help="leave the demo running and print commands to try")
    parser.add_argument("--workdir", help="where logs and rendered configs go (default: a new temp folder)")
    parser.add_argument("--quickstart", action="store_true",
                        help="the smaller demo instead: one Envoy, the OPA-Envoy tutorial policy, no mesh")
    parser.add_argument("--policies", help="policy folder the mesh starts from (copied; default: policies/)")
    parser.add_argument("--idp", choices=["devidp", "oidc-provider"], default="devidp",
                        help="oidc-provider: the browser sign-in, DPoP and introspection tour against a real "
                             "OpenID provider (needs Node.js and `make install`); default: the mesh with the dev IdP")


def run(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="authz-demo-"))
    code = 1
    try:
        if args.idp == "oidc-provider":
            from .signin_demo import run_demo

            return asyncio.run(run_demo(workdir, keep=args.keep))
        if args.quickstart:
            code = asyncio.run(_demo(workdir, keep=args.keep))
        else:
            from .launcher import MeshOptions

            options = MeshOptions(workdir) if not args.policies else MeshOptions(workdir, policies=Path(args.policies))
            code = asyncio.run(mesh_demo(options, keep=args.keep))
    except KeyboardInterrupt:
        print("\nstopped; every process the demo started is gone.")
        code = 130
    finally:
        if args.workdir is None and code in (0, 130):
            shutil.rmtree(workdir, ignore_errors=True)  # a folder we made, for a run that went as promised
        elif code != 0:
            print(f"logs, configs and the decision log are kept in {workdir}", file=sys.stderr)
    return code


async def mesh_demo(options: MeshOptions, *, keep: bool, out: TextIO = sys.stdout) -> int:
    # Imported here: `authz-server --help` builds every command's parser and should stay light.
    from .launcher import running_mesh
    from .meshtour import MeshTour, try_it

    print(f"authz-server demo mesh — logs, configs and the decision log in {options.workdir}\n", file=out)
    started = time.perf_counter()
    async with running_mesh(options, progress=lambda line: print(f"  {line}", file=out)) as mesh:
        print(f"\nthe mesh is up in {time.perf_counter() - started:.1f}s: frontend → orders → payments, each behind "
              f"its own Envoy with an SVID, every request checked by authz-server\n", file=out)
        result = await run_tour(MeshTour(mesh).steps(), out=out)
        _summary(result, out)
        if keep:
            print(try_it(mesh), file=out)
            await _wait_forever()
        return 0 if result.ok else 1


def _summary(result: TourResult, out: TextIO) -> None:
    print(file=out)
    if result.ok:
        print(f"all {len(result.passed)} steps turned out as the tour said.", file=out)
    else:
        print("these steps did not turn out as the tour said:", file=sys.stderr)
        for failed in result.failed:
            print(f"  {failed}", file=sys.stderr)


async def _wait_forever() -> None:
    # Ctrl-C cancels this; the cancellation unwinds the mesh's context managers, which stop
    # every child, and asyncio.run turns it back into KeyboardInterrupt for run() to report.
    await asyncio.Event().wait()


def tutorial_token(role: str, sub: str, *, now: float, ttl: int = 600) -> str:
    """A token as the OPA-Envoy tutorial makes them: HS256 with the key 'secret'."""
    claims = {"role": role, "sub": base64.urlsafe_b64encode(sub.encode()).decode().rstrip("="),
              "nbf": int(now) - 60, "exp": int(now) + ttl}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # the tutorial's key is short
        return jwt.encode(claims, "secret", algorithm="HS256")


@dataclass
class Quickstart:
    front: str  # http://127.0.0.1:PORT of the Envoy listener


async def _demo(workdir: Path, *, keep: bool) -> int:
    print(f"authz-server demo — logs and configs in {workdir}\n")
    with Supervisor(workdir / "logs") as supervisor:
        started = time.perf_counter()
        quickstart = _start_quickstart(supervisor, workdir)
        print(f"up in {time.perf_counter() - started:.1f}s: upstream 'people', authz-server, Envoy on "
              f"{quickstart.front}\n")
        result = await run_tour(_quickstart_tour(quickstart))
        _summary(result, sys.stdout)
        if keep:
            _print_try_it(quickstart)
            await _wait_forever()
        return 0 if result.ok else 1


def _start_quickstart(supervisor: Supervisor, workdir: Path) -> Quickstart:
    upstream_port = free_port()
    supervisor.start("upstream", [sys.executable, "-m", "authz_server.mesh.upstream", "--addr",
                                  f"127.0.0.1:{upstream_port}", "--name", "people"],
                     ready=tcp_ready("127.0.0.1", upstream_port))
    ready_file = workdir / "authz-ready.json"
    ready_file.unlink(missing_ok=True)
    supervisor.start("authz-server", [sys.executable, "-m", "authz_server.cli", "serve",
                                      "--policies", str(QUICKSTART_POLICIES), "--addr", "127.0.0.1:0",
                                      "--metrics-addr", "127.0.0.1:0", "--workers", "1",
                                      "--ready-file", str(ready_file)],
                     ready=ready_file.exists, timeout=30)
    authz_addr = json.loads(ready_file.read_text())["addr"]
    envoy = start_envoy(supervisor, "envoy", render_front_proxy(FrontProxy(
        upstream=f"127.0.0.1:{upstream_port}", authz=AuthzTarget(authz_addr, with_request_body=True),
        routes=(Route("/"),))))
    front = f"http://127.0.0.1:{envoy.port('ingress')}"
    wait_until(tcp_ready("127.0.0.1", envoy.port("ingress")), timeout=10, what="envoy listener")
    return Quickstart(front)


def _quickstart_tour(q: Quickstart) -> list[Step]:
    now = time.time()
    guest = {"authorization": f"Bearer {tutorial_token('guest', 'bob', now=now)}"}
    admin = {"authorization": f"Bearer {tutorial_token('admin', 'alice', now=now)}"}
    expired = {"authorization": f"Bearer {tutorial_token('admin', 'alice', now=now - 7200)}"}

    async def call(method: str, path: str, headers: dict[str, str], body: dict | None = None) -> httpx.Response:
        async with httpx.AsyncClient(base_url=q.front, timeout=5) as client:
            return await client.request(method, path, headers=headers, json=body)

    async def guest_reads() -> Outcome:
        r = await call("GET", "/people/carol", guest)
        outcome = expect_status(r.status_code, 200, "GET /people/carol as guest bob")
        if r.status_code == 200:
            seen = r.json()["headers"]
            outcome.said += (f"\nthe upstream received it with x-authz-decision-id="
                             f"{seen.get('x-authz-decision-id', '(missing)')}")
            outcome.ok = outcome.ok and "x-authz-decision-id" in seen
        return outcome

    async def no_token() -> Outcome:
        r = await call("GET", "/people/carol", {})
        outcome = expect_status(r.status_code, 403, "GET /people/carol without a token")
        if r.headers.get("content-type", "").startswith("application/json"):
            outcome.said += f"\nEnvoy answered for authz-server: {r.json()['error']}"
        return outcome

    async def guest_writes() -> Outcome:
        r = await call("POST", "/people", guest, {"firstname": "Dave"})
        return expect_status(r.status_code, 403, "POST /people as guest (only admins may create)")

    async def admin_writes() -> Outcome:
        r = await call("POST", "/people", admin, {"firstname": "Dave"})
        return expect_status(r.status_code, 200, "POST /people {firstname: Dave} as admin alice (body read by "
                                                "the policy)")

    async def admin_self() -> Outcome:
        r = await call("POST", "/people", admin, {"firstname": "Alice"})
        return expect_status(r.status_code, 403, "POST /people {firstname: Alice} as admin alice (no one may "
                                                "create themselves)")

    async def expired_token() -> Outcome:
        r = await call("GET", "/people/carol", expired)
        return expect_status(r.status_code, 403, "GET /people/carol with a token that expired an hour ago")

    return [
        Step("a guest reads a person: allowed, and the upstream sees the decision id", guest_reads),
        Step("no token: denied by the policy, Envoy never reaches the upstream", no_token),
        Step("a guest tries to create a person: denied", guest_writes),
        Step("an admin creates a person: allowed after the policy read the JSON body", admin_writes),
        Step("an admin tries to create themselves: denied by the body rule", admin_self),
        Step("an expired token: denied", expired_token),
    ]


def _print_try_it(q: Quickstart) -> None:
    token = tutorial_token("guest", "bob", now=time.time(), ttl=3600)
    print(f"""
The demo keeps running (Ctrl-C stops every process it started). Try:

  curl -i {q.front}/people/carol
  curl -i -H 'authorization: Bearer {token}' {q.front}/people/carol
""")
