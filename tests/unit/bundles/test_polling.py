"""When the next bundle request goes out (pure: randomness passed in)."""

from __future__ import annotations

from authz_server.bundles.config import BundleSource, Polling
from authz_server.bundles.download import Download, backoff, next_delay
from authz_server.bundles.service import ServiceError

SOURCE = BundleSource("authz", "cp", "bundles/authz", Polling(10.0, 20.0, long_polling_timeout=30))


def test_polling_waits_between_min_and_max_delay() -> None:
    plain = BundleSource("authz", "cp", "bundles/authz", Polling(10.0, 20.0))
    assert next_delay(plain, Download(body=b"x"), 0, rand=lambda: 0.0) == 10.0
    assert next_delay(plain, Download(not_modified=True), 0, rand=lambda: 1.0) == 20.0


def test_long_polling_asks_again_at_once_only_when_the_server_supports_it() -> None:
    assert next_delay(SOURCE, Download(not_modified=True, long_poll=True), 0) == 0.0
    assert next_delay(SOURCE, Download(not_modified=True, long_poll=False), 0, rand=lambda: 0.5) == 15.0


def test_errors_and_refused_bundles_back_off_as_opa_does() -> None:
    assert backoff(0, 20.0) == 0.0
    middle = lambda: 0.5  # noqa: E731 (no jitter)
    assert abs(backoff(1, 20.0, rand=middle) - 0.16) < 1e-9
    assert abs(backoff(2, 20.0, rand=middle) - 0.256) < 1e-9
    assert backoff(50, 20.0, rand=middle) == 20.0  # capped at the max delay
    assert 0.8 * 20.0 <= backoff(50, 20.0) <= 1.2 * 20.0  # jitter: 20 %
    failed = Download(error=ServiceError("refused"))
    assert abs(next_delay(SOURCE, failed, 1, rand=middle) - 0.16) < 1e-9
    # a long poll would hand back a refused bundle at once: it backs off too
    assert abs(next_delay(SOURCE, Download(body=b"x", long_poll=True), 1, refused=True, rand=middle) - 0.16) < 1e-9
