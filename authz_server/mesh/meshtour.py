"""The demo mesh's scripted tour: what each actor does, what the mesh decided, and why.

Each step is real traffic through the real sidecars: users call the frontend's public door,
"frontend calls orders" is a request to the frontend sidecar's outbound listener (what the
frontend app would do), the operator and orders use their own SVIDs (fetched from their
Workload API sockets) for the admin API and the token exchange.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient

from .._proto import authz_admin_pb2 as admin_pb
from .._proto import authz_admin_pb2_grpc as admin_grpc
from .launcher import Mesh
from .tour import Outcome, Step, expect_status

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"


def svid_files(socket: Path, folder: Path) -> tuple[Path, Path, Path]:
    """The workload's current SVID (chain, key) and trust bundles as PEM files, from its socket."""
    client = WorkloadApiClient(f"unix://{socket}")
    try:
        context = client.fetch_x509_context(timeout=10)
    finally:
        client.close()
    svid = context.default_svid
    folder.mkdir(parents=True, exist_ok=True)
    chain = folder / "svid.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain))
    key = folder / "svid.key"
    key.write_bytes(svid.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    key.chmod(0o600)
    bundle = folder / "bundle.pem"
    bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                for b in context.x509_bundle_set.bundles for c in b.x509_authorities))
    return chain, key, bundle


def client_tls(socket: Path, folder: Path) -> ssl.SSLContext:
    chain, key, bundle = svid_files(socket, folder)
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False  # SPIFFE certificates name a URI, not a host
    context.load_cert_chain(chain, key)
    return context


class MeshTour:
    """State the steps share (alice's token, her session id) and the steps themselves."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.token = ""
        self.session = ""
        self.scratch = Path(tempfile.mkdtemp(prefix="tour-", dir=mesh.options.workdir))

    async def request(self, url: str, method: str, path: str, headers: dict[str, str] | None = None,
                      **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return await client.request(method, path, headers=headers or {}, **kwargs)

    async def sign_in(self, username: str) -> str:
        password = f"{username}-password"
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(f"{self.mesh.idp.issuer}/token", auth=("web", "web-secret"), data={
                "grant_type": "password", "username": username, "password": password,
                "scope": "orders:read orders:write payments:write"})
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    @staticmethod
    def _why(response: httpx.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return ""
        if isinstance(body, dict) and "error" in body:
            return f" — authz-server: {body['error']}" + (f" ({body['message']})" if body.get("message") else "")
        return ""

    # -- steps
    async def signs_in(self) -> Outcome:
        self.token = await self.sign_in("alice")
        r = await self.request(self.mesh.public_url, "GET", "/account",
                               {"authorization": f"Bearer {self.token}", "user-agent": "tour-browser/1"})
        self.session = r.headers.get("x-session-id", "")
        outcome = expect_status(r.status_code, 200, "alice (password grant at the dev IdP) → GET /account with "
                                                    "her JWT")
        seen = r.json().get("headers", {}) if r.status_code == 200 else {}
        outcome.said += (f"\nauthz-server validated the token once and minted session {self.session[:8]}… "
                         f"(x-session-id); the frontend app saw x-authz-subject={seen.get('x-authz-subject')} "
                         f"and {'no' if 'authorization' not in seen else 'an'} Authorization header")
        outcome.ok = outcome.ok and bool(self.session) and "authorization" not in seen
        return outcome

    async def session_alone(self) -> Outcome:
        r = await self.request(self.mesh.public_url, "GET", "/",
                               {"x-session-id": self.session, "user-agent": "tour-browser/1"})
        return expect_status(r.status_code, 200, "GET / with only the session id (a store lookup, no crypto)")

    async def frontend_calls_orders(self) -> Outcome:
        r = await self.request(self.mesh.url("frontend", "orders"), "POST", "/orders",
                               {"x-session-id": self.session}, json={"item": "book"})
        outcome = expect_status(r.status_code, 200, "frontend → orders POST /orders, forwarding alice's session "
                                                    "over mTLS with its SVID")
        if r.status_code == 200:
            xfcc = r.json()["headers"].get("x-forwarded-client-cert", "")
            outcome.said += f"\norders saw the caller {_xfcc_uri(xfcc)} acting for alice (delegation)"
        return outcome

    async def frontend_calls_payments(self) -> Outcome:
        r = await self.request(self.mesh.url("frontend", "payments"), "POST", "/payments",
                               {"x-session-id": self.session}, json={"amount": 12})
        outcome = expect_status(r.status_code, 403, "frontend → payments POST /payments directly")
        outcome.said += self._why(r) or "\npayments (high sensitivity) admits only orders, with a session bound to it"
        return outcome

    async def orders_exchanges_and_pays(self) -> Outcome:
        tls = await asyncio.to_thread(client_tls, self.mesh.sockets["orders"], self.scratch / "orders")
        async with httpx.AsyncClient(verify=tls, timeout=10) as client:
            exchanged = await client.post(f"https://{self.mesh.authz['exchange_addr']}/token", data={
                "grant_type": TOKEN_EXCHANGE, "subject_token": self.token, "subject_token_type": ACCESS_TOKEN,
                "audience": "payments", "scope": "payments:write"})
        if exchanged.status_code != 200:
            return Outcome(False, f"token exchange refused: HTTP {exchanged.status_code} {exchanged.text[:200]}")
        token = exchanged.json()["access_token"]
        r = await self.request(self.mesh.url("orders", "payments"), "POST", "/payments",
                               {"authorization": f"Bearer {token}"}, json={"amount": 12})
        outcome = expect_status(r.status_code, 200, "orders exchanges alice's token (RFC 8693, audience payments, "
                                                    "bound to orders' certificate) → POST /payments")
        if r.status_code == 200:
            again = await self.request(self.mesh.url("orders", "payments"), "POST", "/payments",
                                       {"x-session-id": r.headers.get("x-session-id", "")}, json={"amount": 3})
            outcome.said += f"\nthen the session bound to orders alone: HTTP {again.status_code}"
            outcome.ok = again.status_code == 200
        return outcome

    async def replayed_token(self) -> Outcome:
        r = await self.request(self.mesh.url("orders", "payments"), "POST", "/payments",
                               {"authorization": f"Bearer {self.token}"}, json={"amount": 999})
        outcome = expect_status(r.status_code, 401, "alice's token, stolen and replayed by another client (orders' "
                                                    "workload)")
        outcome.said += self._why(r)
        outcome.ok = outcome.ok and "token_replay" in r.text
        return outcome

    async def stolen_session(self) -> Outcome:
        r = await self.request(self.mesh.url("orders", "payments"), "POST", "/payments",
                               {"x-session-id": self.session}, json={"amount": 999})
        outcome = expect_status(r.status_code, 401, "alice's session id used by orders, which is not a client it is "
                                                    "bound to")
        outcome.said += self._why(r)
        return outcome

    async def revoke(self) -> Outcome:
        tls = await asyncio.to_thread(svid_files, self.mesh.sockets["operator"], self.scratch / "operator")
        chain, key, bundle = (p.read_bytes() for p in tls)
        credentials = grpc.ssl_channel_credentials(bundle, key, chain)
        options = (("grpc.ssl_target_name_override", "authz-server"),)
        async with grpc.aio.secure_channel(self.mesh.authz["admin_addr"], credentials, options) as channel:
            answer = await admin_grpc.AdminStub(channel).RevokeSubject(admin_pb.RevokeSubjectRequest(subject="alice"),
                                                                        timeout=10)
        started = time.perf_counter()
        r = await self.request(self.mesh.public_url, "GET", "/",
                               {"x-session-id": self.session, "user-agent": "tour-browser/1"})
        outcome = expect_status(r.status_code, 401, "the operator revokes every session of alice (admin API, mTLS "
                                                    "as spiffe://example.org/operator); her session id again")
        outcome.said += (f"{self._why(r)}\nrevocation generation {answer.generation}; refused "
                         f"{(time.perf_counter() - started) * 1000:.0f} ms after the revoke returned")
        return outcome

    async def policy_edit(self) -> Outcome:
        token = await self.sign_in("bob")
        first = await self.request(self.mesh.public_url, "DELETE", "/account/cart",
                                   {"authorization": f"Bearer {token}", "user-agent": "tour-browser/1"})
        session = first.headers.get("x-session-id", "")
        before = first.status_code
        data_file = self.mesh.policies_dir / "data.yaml"
        text = data_file.read_text()
        edited = re.sub(r"(\{prefix: /account, methods: \[GET, POST)\]", r"\1, DELETE]", text, count=1)
        if edited == text:
            return Outcome(False, "could not find the frontend /account route in data.yaml to edit")
        data_file.write_text(edited)
        deadline = time.monotonic() + 10
        after = before
        while time.monotonic() < deadline:
            r = await self.request(self.mesh.public_url, "DELETE", "/account/cart",
                                   {"authorization": f"Bearer {token}", "user-agent": "tour-browser/1"} if not session
                                   else {"x-session-id": session, "user-agent": "tour-browser/1"})
            after = r.status_code
            session = session or r.headers.get("x-session-id", "")
            if after == 200:
                break
            await asyncio.sleep(0.1)  # polling the outcome itself: the reload has no other signal a client sees
        return Outcome(before == 403 and after == 200,
                       f"bob: DELETE /account/cart → HTTP {before}; data.yaml edited on disk to allow DELETE → "
                       f"HTTP {after}, with no restart (the last good policy served until the new one compiled)")

    async def rotation(self) -> Outcome:
        session = await self._fresh_session("bob")
        results: list[int] = []
        certificates: set[str] = set()

        async def traffic(stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=self.mesh.url("frontend", "orders"), timeout=10) as client:
                while not stop.is_set():
                    r = await client.get("/orders", headers={"x-session-id": session})
                    results.append(r.status_code)
                    if r.status_code == 200:
                        certificates.add(_xfcc_hash(r.json()["headers"].get("x-forwarded-client-cert", "")))

        stop = asyncio.Event()
        task = asyncio.create_task(traffic(stop))
        await _until(lambda: len(results) >= 20)
        rotated = await self.mesh.identity.rotate_now()
        seen_before = len(certificates)
        await _until(lambda: len(certificates) > seen_before, timeout=15)
        count = len(results)
        await _until(lambda: len(results) >= count + 20)
        stop.set()
        await task
        failed = sum(1 for status in results if status != 200)
        return Outcome(failed == 0 and len(certificates) > 1,
                       f"every SVID re-issued now ({rotated}); {len(results)} calls frontend → orders during the "
                       f"rotation, {failed} failed; orders saw {len(certificates)} different frontend certificates")

    async def _fresh_session(self, username: str) -> str:
        token = await self.sign_in(username)
        r = await self.request(self.mesh.public_url, "GET", "/",
                               {"authorization": f"Bearer {token}", "user-agent": "tour-browser/1"})
        return r.headers.get("x-session-id", "")

    def steps(self) -> list[Step]:
        return [
            Step("alice signs in once; the mesh gives her a session", self.signs_in),
            Step("the session id alone works", self.session_alone),
            Step("frontend calls orders on alice's behalf: allowed", self.frontend_calls_orders),
            Step("frontend calls payments directly: denied", self.frontend_calls_payments),
            Step("orders pays with a token exchanged for alice: allowed", self.orders_exchanges_and_pays),
            Step("a replayed token from another client: refused", self.replayed_token),
            Step("a session id presented by a client it is not bound to: refused", self.stolen_session),
            Step("a revoked session stops working at once", self.revoke),
            Step("a policy edited on disk takes effect without a restart", self.policy_edit),
            Step("an SVID rotation passes unnoticed", self.rotation),
        ]


def _xfcc_uri(xfcc: str) -> str:
    found = re.search(r"URI=([^;,]+)", xfcc)
    return found.group(1) if found else "(no client certificate)"


def _xfcc_hash(xfcc: str) -> str:
    found = re.search(r"Hash=([0-9a-f]+)", xfcc)
    return found.group(1) if found else ""


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the mesh did not get there in time")
        await asyncio.sleep(0.02)


def try_it(mesh: Mesh) -> str:
    """What to type by hand while ``demo --keep`` runs."""
    return f"""
The mesh keeps running (Ctrl-C stops every process it started). Try:

  # sign in as alice at the dev identity provider
  TOKEN=$(curl -s -u web:web-secret -d grant_type=password -d username=alice -d password=alice-password \\
          {mesh.idp.issuer}/token | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  # the first call with the token returns a session id
  curl -si -H "authorization: Bearer $TOKEN" {mesh.public_url}/account | grep -i x-session-id
  SESSION=...   # paste it
  curl -s -H "x-session-id: $SESSION" {mesh.public_url}/               # the session alone
  curl -s -H "x-session-id: $SESSION" {mesh.url('frontend', 'orders')}/orders    # as frontend, for alice
  curl -si -H "x-session-id: $SESSION" -X POST {mesh.url('frontend', 'payments')}/payments   # denied

  decisions: {mesh.audit_path}   logs: {mesh.supervisor.log_dir}
  policies (edit them, they reload): {mesh.policies_dir}
  metrics: http://{mesh.authz.get('metrics_addr')}/metrics
"""

