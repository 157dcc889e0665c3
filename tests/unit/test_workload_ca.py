"""A trust domain's CA on disk and its rotation schedule, with time passed in."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from authz_server.errors import ConfigError
from authz_server.workload.ca import CertificateAuthority

NOW = 1_700_000_000.0  # a fixed clock: every check here takes `now`
TTL = 1000.0
AHEAD = 30.0


def ca(directory: Path, now: float = NOW) -> CertificateAuthority:
    return CertificateAuthority("example.org", directory, ca_ttl=TTL, publish_ahead=AHEAD, jwt_algorithm="ES256",
                                now=now)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_on_first_start_with_private_modes(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "example.org"
    authority = ca(directory).active
    assert mode(directory) == 0o700
    assert mode(directory / f"{authority.id}.ca.key") == 0o600
    assert mode(directory / f"{authority.id}.jwt.key") == 0o600
    assert mode(directory / "authorities.json") == 0o600
    assert (directory / f"{authority.id}.ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in (directory / f"{authority.id}.ca.key").read_bytes()


def test_persisted_across_restarts(tmp_path: Path) -> None:
    first = ca(tmp_path)
    second = ca(tmp_path, now=NOW + 100)
    assert second.active.id == first.active.id
    assert second.active.certificate == first.active.certificate
    assert second.active.jwt_kid == first.active.jwt_kid
    assert second.bundle().x509_der() == first.bundle().x509_der()


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    authority = ca(tmp_path).active
    key = tmp_path / f"{authority.id}.ca.key"
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError) as caught:
        ca(tmp_path)
    assert caught.value.key == "state_dir"
    assert "chmod 600" in caught.value.message and str(key) in caught.value.message


def test_state_of_another_domain_or_corrupt_is_refused(tmp_path: Path) -> None:
    ca(tmp_path)
    manifest = tmp_path / "authorities.json"
    data = json.loads(manifest.read_text())
    with pytest.raises(ConfigError, match="belongs to trust domain"):
        CertificateAuthority("partner.org", tmp_path, ca_ttl=TTL, publish_ahead=AHEAD, jwt_algorithm="ES256", now=NOW)
    manifest.write_text("{")
    with pytest.raises(ConfigError, match="not a readable authorities file"):
        ca(tmp_path)
    manifest.write_text(json.dumps({**data, "active": "../../etc/passwd"}))
    with pytest.raises(ConfigError, match="bad authority id"):
        ca(tmp_path)


def test_rotation_keeps_old_and_new_in_the_bundle(tmp_path: Path) -> None:
    authority = ca(tmp_path)
    old = authority.active
    sequence = authority.sequence
    change = authority.prepare(NOW + 10)
    assert change.bundle_changed and not change.activated
    new = authority.prepared
    assert new is not None and authority.active is old  # published, not signing yet
    bundle = authority.bundle()
    assert bundle.x509_authorities == (old.certificate, new.certificate)
    assert [kid for kid, _ in bundle.jwt_authorities] == [old.jwt_kid, new.jwt_kid]
    assert bundle.sequence > sequence
    assert authority.next_event() == pytest.approx(NOW + 10 + AHEAD)

    change = authority.advance(NOW + 10 + AHEAD)
    assert change.activated and not change.bundle_changed
    assert authority.active is new and authority.retired == [old]
    assert authority.bundle().x509_authorities == (old.certificate, new.certificate)  # old stays

    # the retired CA leaves the bundle at its notAfter, and its files go
    change = authority.advance(old.not_after)
    assert change.bundle_changed
    remaining = authority.bundle().x509_authorities
    assert old.certificate not in remaining and remaining[0] == new.certificate
    # (by then the new CA is past its own half-life, so its successor is already published)
    assert authority.prepared is not None and remaining[1:] == (authority.prepared.certificate,)
    assert not (tmp_path / f"{old.id}.ca.key").exists()


def test_rotation_state_survives_a_restart(tmp_path: Path) -> None:
    authority = ca(tmp_path)
    authority.prepare(NOW, activate_after=60)
    again = ca(tmp_path, now=NOW + 1)
    assert again.prepared is not None and again.prepared.id == authority.prepared.id  # type: ignore[union-attr]
    assert again.activate_at == pytest.approx(NOW + 60)
    assert len(again.bundle().x509_authorities) == 2


def test_successor_published_at_half_life_then_activated(tmp_path: Path) -> None:
    authority = ca(tmp_path)
    first = authority.active
    assert authority.next_event() == pytest.approx(first.midlife)
    assert not authority.advance(first.midlife - 1)
    change = authority.advance(first.midlife)
    assert change.bundle_changed and authority.prepared is not None
    assert authority.activate_at == pytest.approx(first.midlife + AHEAD)
    assert authority.advance(first.midlife + AHEAD).activated
    assert authority.active is not first


def test_expired_ca_is_replaced_at_start(tmp_path: Path) -> None:
    first = ca(tmp_path).active
    later = ca(tmp_path, now=NOW + 10 * TTL)
    change = later.advance(NOW + 10 * TTL)
    assert change.activated
    assert later.active.id != first.id
    assert later.active.not_after > NOW + 10 * TTL
