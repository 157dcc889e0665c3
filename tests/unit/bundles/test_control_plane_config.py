"""OPA's control-plane keys in authz-server's config file: an OPA config works, mistakes name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_server.config import config_from_mapping
from authz_server.errors import ConfigError

OPA_CONFIG = {
    "services": [{"name": "acmecorp", "url": "https://example.com/control-plane-api/v1",
                  "credentials": {"bearer": {"token": "bGFza2RqZmxha3NkamZsa2Fqc2Rsa2ZqYWtsc2RqZgo"}}}],
    "bundles": {"authz": {"service": "acmecorp", "resource": "bundles/http/example/authz.tar.gz",
                          "persist": True, "polling": {"min_delay_seconds": 60, "max_delay_seconds": 120},
                          "signing": {"keyid": "global_key", "scope": "write"}}},
    "keys": {"global_key": {"algorithm": "HS256", "key": "secret"}},
    "decision_logs": {"service": "acmecorp", "reporting": {"min_delay_seconds": 300, "max_delay_seconds": 600}},
    "status": {"service": "acmecorp"},
}


def test_an_opa_config_is_read_with_opas_meaning() -> None:
    plane = config_from_mapping(OPA_CONFIG).control_plane
    assert plane is not None
    service = plane.services["acmecorp"]
    assert service.url == "https://example.com/control-plane-api/v1" and service.bearer_token.startswith("bGFz")
    (bundle,) = plane.bundles
    assert (bundle.resource, bundle.persist, bundle.polling.min_delay, bundle.polling.max_delay) == \
        ("bundles/http/example/authz.tar.gz", True, 60, 120)
    assert bundle.verification is not None and bundle.verification.required and bundle.verification.keyid == \
        "global_key"
    assert plane.decision_logs is not None and plane.decision_logs.resource == "/logs"
    assert plane.decision_logs.mask_decision == "system/log/mask" and plane.decision_logs.upload_size_limit == 32768
    assert plane.status is not None and plane.status.resource == "/status"


def test_defaults_follow_opa() -> None:
    plane = config_from_mapping({"services": {"cp": {"url": "http://cp:8181/"}}, "bundles": {"authz": {}},
                                 "decision_logs": {"reporting": {"upload_size_limit_bytes": 10}}}).control_plane
    assert plane is not None
    assert plane.services["cp"].url == "http://cp:8181"
    assert plane.bundles[0].resource == "bundles/authz" and plane.bundles[0].service == "cp"
    assert plane.bundles[0].verification is None and plane.persistence_directory == ".opa"
    assert plane.decision_logs is not None and plane.decision_logs.upload_size_limit == 90  # OPA's minimum


@pytest.mark.parametrize("change, key", [
    ({"policies": "policies/"}, "bundles"),
    ({"bundles": {"authz": {"service": "nope"}}}, "bundles.authz.service"),
    ({"bundles": {"authz": {"signing": {"keyid": "missing"}}}}, "bundles.authz.signing.keyid"),
    ({"bundles": {"authz": {"polling": {"min_delay_seconds": 10}}}}, "bundles.authz.polling"),
    ({"bundles": {"authz": {"polling": {"min_delay_seconds": 10, "max_delay_seconds": 5}}}},
     "bundles.authz.polling.max_delay_seconds"),
    ({"bundles": {"authz": {"polling": {"long_polling_timeout_seconds": 0}}}},
     "bundles.authz.polling.long_polling_timeout_seconds"),
    ({"bundles": {"authz": {"trigger": "manual"}}}, "bundles.authz.trigger"),
    ({"services": [{"name": "acmecorp", "url": "https://x", "credentials": {"oauth2": {}}}]},
     "services[0].credentials.oauth2"),
    ({"services": [{"name": "acmecorp", "url": "ftp://x"}]}, "services[0].url"),
    ({"keys": {"global_key": {"algorithm": "RS007", "key": "x"}}}, "keys.global_key.algorithm"),
    ({"keys": {"global_key": {"algorithm": "RS256", "key": "not a PEM key"}}}, "keys.global_key.key"),
    ({"decision_logs": {"console": True}}, "decision_logs.console"),
    ({"decision_logs": {"mask_decision": "not a path!"}}, "decision_logs.mask_decision"),
    ({"shadow": {"bundle": "unknown"}}, "shadow.bundle"),
    ({"shadow": {"policies": "p", "bundle": "authz"}}, "shadow"),
    ({"shadow": {"bundle": "authz", "sample": 1.5}}, "shadow.sample"),
])
def test_a_mistake_names_its_key(change: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_mapping({**OPA_CONFIG, **change})
    assert raised.value.key == key, raised.value.message


def test_a_shadow_bundle_is_not_part_of_the_live_set(tmp_path: Path) -> None:
    config = config_from_mapping({"policies": str(tmp_path), "services": OPA_CONFIG["services"],
                                  "bundles": {"next": {}}, "shadow": {"bundle": "next", "sample": 0.5}})
    plane = config.control_plane
    assert plane is not None and plane.live_bundles == () and plane.shadow_bundle is not None
    assert plane.shadow is not None and plane.shadow.sample == 0.5
