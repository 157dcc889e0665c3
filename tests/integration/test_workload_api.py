"""The SPIFFE Workload API on real Unix sockets, driven by the real py-spiffe client
(``WorkloadApiClient``, ``X509Source``, ``JwtSource``): SVIDs, bundles, federation, JWT-SVIDs,
pushes on rotation, and the security-header check."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from spiffe import JwtSource, JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.workloadapi.errors import FetchJwtSvidError, ValidateJwtSvidError

from authz_server.workload import IdentityConfig, IdentityServerThread

A, B = "spiffe://example.org/a", "spiffe://example.org/b"
PARTNER, EVIL = "spiffe://partner.org/p", "spiffe://evil.org/e"
HEADER = (("workload.spiffe.io", "true"),)


def identity_config(tmp_path: Path, **overrides: Any) -> IdentityConfig:
    return IdentityConfig.from_dict({
        "state_dir": "state", "svid_ttl": "1h",
        "trust_domains": [{"name": "example.org", "federates_with": ["partner.org"]},
                          {"name": "partner.org", "federates_with": ["example.org"]},
                          {"name": "evil.org"}],
        "workloads": [{"name": "a", "spiffe_id": A, "socket": "run/a.sock"},
                      {"name": "b", "spiffe_id": B, "socket": "run/b.sock"},
                      {"name": "p", "spiffe_id": PARTNER, "socket": "run/p.sock"},
                      {"name": "e", "spiffe_id": EVIL, "socket": "run/e.sock"}],
        **overrides,
    }, base_dir=tmp_path)


@pytest.fixture
def identity(tmp_path: Path) -> Iterator[IdentityServerThread]:
    with IdentityServerThread(identity_config(tmp_path)) as server:
        yield server


def client(identity: IdentityServerThread, workload: str) -> WorkloadApiClient:
    return WorkloadApiClient("unix:" + identity.server.sockets[workload], default_timeout=10)


class Updates:
    """Counts an X509Source's/JwtSource's update callbacks; ``wait`` blocks on an Event, not a sleep."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait(self, beyond: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.count > beyond, timeout):
                raise AssertionError(f"no update after {timeout}s (seen {self.count})")


def test_sockets_are_private_and_each_is_its_workload(identity: IdentityServerThread, tmp_path: Path) -> None:
    for name, expected in (("a", A), ("b", B), ("p", PARTNER)):
        path = Path(identity.server.sockets[name])
        assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
        with client(identity, name) as c:
            assert str(c.fetch_x509_svid().spiffe_id) == expected
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700


def test_x509_svid_and_bundles(identity: IdentityServerThread) -> None:
    with client(identity, "a") as c:
        svid = c.fetch_x509_svid()
        assert str(svid.spiffe_id) == A
        assert svid.leaf.serial_number == identity.snapshot("a").svid.serial_number
        context = c.fetch_x509_context()
        bundles = c.fetch_x509_bundles()
    own = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    assert own is not None
    (authority,) = own.x509_authorities
    svid.leaf.verify_directly_issued_by(authority)
    # federated partner.org is served, evil.org (not federated) is not
    assert bundles.get_bundle_for_trust_domain(TrustDomain("partner.org")) is not None
    assert bundles.get_bundle_for_trust_domain(TrustDomain("evil.org")) is None
    assert context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("partner.org")) is not None
    assert context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("evil.org")) is None


def test_jwt_svids_fetch_and_validate(identity: IdentityServerThread) -> None:
    with client(identity, "a") as a, client(identity, "b") as b, client(identity, "e") as e:
        token = a.fetch_jwt_svid({"orders"})
        assert str(token.spiffe_id) == A and token.audience == {"orders"}
        # B validates A's token through its own Workload API ...
        assert str(b.validate_jwt_svid(token.token, "orders").spiffe_id) == A
        with pytest.raises(ValidateJwtSvidError):
            b.validate_jwt_svid(token.token, "payments")
        # ... and locally, with the JWT bundles it fetched
        bundles = b.fetch_jwt_bundles()
        parsed = JwtSvid.parse_and_validate(token.token,
                                            bundles.get_bundle_for_trust_domain(TrustDomain("example.org")),
                                            {"orders"})
        assert str(parsed.spiffe_id) == A
        assert bundles.get_bundle_for_trust_domain(TrustDomain("partner.org")) is not None
        # the subject may only be the workload's own ID
        assert str(a.fetch_jwt_svid({"orders"}, subject=SpiffeId(A)).spiffe_id) == A
        with pytest.raises(FetchJwtSvidError):
            a.fetch_jwt_svid({"orders"}, subject=SpiffeId(B))
        # federation: partner.org's token is accepted by example.org's workload, evil.org's is not
        with client(identity, "p") as p:
            assert str(b.validate_jwt_svid(p.fetch_jwt_svid({"orders"}).token, "orders").spiffe_id) == PARTNER
        with pytest.raises(ValidateJwtSvidError):
            b.validate_jwt_svid(e.fetch_jwt_svid({"orders"}).token, "orders")


def test_short_ttl_rotation_is_pushed_to_an_x509_source(tmp_path: Path) -> None:
    with IdentityServerThread(identity_config(tmp_path, svid_ttl="4s", ca_ttl="1h")) as identity:
        source = X509Source(socket_path="unix:" + identity.server.sockets["a"], timeout_in_seconds=10)
        try:
            updates = Updates()
            source.subscribe_for_updates(updates)
            serials = [source.get_x509_context().default_svid.leaf.serial_number]
            for round_ in range(2):  # a new SVID every 2 s, pushed without asking
                updates.wait(round_, timeout=10)
                serials.append(source.get_x509_context().default_svid.leaf.serial_number)
            assert len(set(serials)) == 3
            leaf = source.get_x509_context().default_svid.leaf
            assert leaf.not_valid_after_utc.timestamp() - time.time() <= 4
        finally:
            source.close()


def test_forced_svid_and_ca_rotations_are_pushed(identity: IdentityServerThread) -> None:
    source = X509Source(socket_path="unix:" + identity.server.sockets["a"], timeout_in_seconds=10)
    jwt_source = JwtSource(socket_path="unix:" + identity.server.sockets["a"], timeout_in_seconds=10)
    try:
        updates, jwt_updates = Updates(), Updates()
        source.subscribe_for_updates(updates)
        jwt_source.subscribe_for_updates(jwt_updates)
        before = source.get_x509_context().default_svid.leaf.serial_number
        assert identity.rotate_now("a") == 1
        updates.wait(0, timeout=10)
        assert source.get_x509_context().default_svid.leaf.serial_number != before

        # a CA rotation of the federated partner: both CAs (and JWT keys) reach A's sources
        seen = updates.count
        identity.rotate_ca("partner.org", activate_after=60)
        updates.wait(seen, timeout=10)
        jwt_updates.wait(0, timeout=10)
        partner = source.get_x509_context().x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("partner.org"))
        assert partner is not None and len(partner.x509_authorities) == 2
        partner_jwt = jwt_source.get_bundle_for_trust_domain(TrustDomain("partner.org"))
        assert partner_jwt is not None and len(partner_jwt.jwt_authorities) == 2
    finally:
        source.close()
        jwt_source.close()


def test_rotate_everything_or_nothing_unknown(identity: IdentityServerThread) -> None:
    before = {name: identity.snapshot(name).svid.serial_number for name in ("a", "b", "p", "e")}
    assert identity.rotate_now() == 4
    assert all(identity.snapshot(name).svid.serial_number != serial for name, serial in before.items())
    with pytest.raises(KeyError):
        identity.rotate_now("nobody")
    with pytest.raises(KeyError):
        identity.rotate_ca("nowhere.org")


def test_calls_without_the_security_header_are_refused(identity: IdentityServerThread) -> None:
    with grpc.insecure_channel("unix:" + identity.server.sockets["a"]) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        calls = {
            "FetchX509SVID": lambda md: next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=md)),
            "FetchX509Bundles": lambda md: next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=md)),
            "FetchJWTBundles": lambda md: next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=md)),
            "FetchJWTSVID": lambda md: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=md),
            "ValidateJWTSVID": lambda md: stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="x", svid="a.b.c"), metadata=md),
        }
        for name, call in calls.items():
            for metadata in ((), (("workload.spiffe.io", "false"),)):
                with pytest.raises(grpc.RpcError) as caught:
                    call(metadata)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                assert "security header" in (caught.value.details() or ""), name
        # with the header, the same stub works
        assert next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)).svids[0].spiffe_id == A


def test_bad_requests_get_errors_and_the_server_keeps_serving(identity: IdentityServerThread) -> None:
    with grpc.insecure_channel("unix:" + identity.server.sockets["a"]) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        bad = [
            (lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=HEADER), "INVALID_ARGUMENT"),
            (lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"], spiffe_id="not an id"),
                                       metadata=HEADER), "INVALID_ARGUMENT"),
            (lambda: stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(svid="a.b.c"), metadata=HEADER),
             "INVALID_ARGUMENT"),
            (lambda: stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="x", svid="garbage" * 1000),
                                          metadata=HEADER), "INVALID_ARGUMENT"),
            (lambda: stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="x", svid=""),
                                          metadata=HEADER), "INVALID_ARGUMENT"),
        ]
        for call, code in bad:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code().name == code
        # undecodable bytes for a request message
        raw = channel.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID", request_serializer=None,
                                  response_deserializer=None)
        with pytest.raises(grpc.RpcError):
            raw(b"\xff\xff\xff\xff", metadata=HEADER)
        token = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER).svids[0].svid
        validated = stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="x", svid=token),
                                         metadata=HEADER)
        assert validated.spiffe_id == A
        assert list(validated.claims["aud"]) == ["x"]


def test_stop_removes_the_sockets(tmp_path: Path) -> None:
    config = identity_config(tmp_path, ready_file="run/ready")
    identity = IdentityServerThread(config).start()
    sockets = [Path(p) for p in identity.server.sockets.values()]
    assert all(p.exists() for p in sockets) and (tmp_path / "run" / "ready").exists()
    identity.stop()
    assert not any(p.exists() for p in sockets)
    assert not (tmp_path / "run" / "ready").exists()


def test_a_ready_file_left_by_a_dead_process_is_removed_before_start(tmp_path: Path) -> None:
    from authz_server.workload.server import _remove_stale_ready_file

    ready = tmp_path / "ready"
    for content, kept in (('{"pid": 999999999}', False), ("garbage", False), (f'{{"pid": {os.getpid()}}}', True)):
        ready.write_text(content)
        _remove_stale_ready_file(ready)
        assert ready.exists() is kept, content
