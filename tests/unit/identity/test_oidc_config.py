"""IssuerConfig.from_mapping / parse_issuers: every mistake names its key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from authz_server.errors import ConfigError
from authz_server.identity.encoding import b64url_encode
from authz_server.identity.jwks import RefreshSettings, cache_max_age
from authz_server.identity.oidc import IssuerConfig, IssuerRegistry, parse_issuers
from tests.support.jwt import issuer_jwks

BASE = {"issuer": "https://idp.example.org", "audiences": ["orders-api"]}


def config_error(data: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        if isinstance(data, list):
            parse_issuers(data, **kwargs)
        else:
            IssuerConfig.from_mapping(data, "issuers[0]", **kwargs)
    return caught.value


def test_defaults_use_discovery_and_the_safe_algorithms() -> None:
    config = IssuerConfig.from_mapping(BASE, "issuers[0]")
    assert config.discovery == "https://idp.example.org/.well-known/openid-configuration"
    assert config.algorithms == ("RS256", "ES256") and config.jwks_uri is None and config.tls_verify
    policy = config.policy()
    assert policy.issuer == BASE["issuer"] and policy.audiences == ("orders-api",) and policy.typ is None


def test_discovery_url_drops_a_trailing_slash_of_the_issuer() -> None:
    config = IssuerConfig.from_mapping({**BASE, "issuer": "https://kc.example.org/realms/demo/"}, "issuers[0]")
    assert config.discovery == "https://kc.example.org/realms/demo/.well-known/openid-configuration"


def test_every_setting_is_read() -> None:
    config = IssuerConfig.from_mapping({
        **BASE, "jwks_uri": "https://idp.example.org/keys", "algorithms": ["ES256"], "leeway": "45s",
        "required_claims": ["sub", "tenant"], "typ": "at+jwt", "max_token_bytes": 4096, "max_header_bytes": 512,
        "max_payload_bytes": 2048, "require_sender_constraint": True, "tls_verify": True,
        "refresh": {"default_max_age": "10m", "min_max_age": "30s", "max_max_age": "2h",
                    "unknown_kid_interval": "1m", "max_stale": "15m", "retry_interval": "5s", "timeout": "2s",
                    "max_bytes": 65536},
    }, "issuers[0]")
    assert config.leeway == 45 and config.typ == "at+jwt" and config.require_sender_constraint
    assert config.refresh == RefreshSettings(600, 30, 7200, 60, 900, 5, 2, 65536)
    assert config.policy().max_header_bytes == 512


@pytest.mark.parametrize("data, key, words", [
    ({"audiences": ["a"]}, "issuers[0].issuer", "required"),
    ({"issuer": "https://x"}, "issuers[0].audiences", "required"),
    ({**BASE, "audiences": []}, "issuers[0].audiences", "at least one"),
    ({**BASE, "issuer": "http://idp.example.org"}, "issuers[0].issuer", "https"),
    ({**BASE, "issuer": "https://idp.example.org?x=1"}, "issuers[0].issuer", "query"),
    ({**BASE, "algorithms": ["RS256", "none"]}, "issuers[0].algorithms", "never"),
    ({**BASE, "algorithms": ["RS257"]}, "issuers[0].algorithms", "unknown algorithm"),
    ({**BASE, "algorithms": ["RS256", "HS256"]}, "issuers[0].algorithms", "mixes HMAC"),
    ({**BASE, "algorithms": ["HS256"]}, "issuers[0].algorithms", "shared_secret_file"),
    ({**BASE, "shared_secret_file": "s"}, "issuers[0].shared_secret_file", "only used with HS"),
    ({**BASE, "jwks_file": "a", "jwks_uri": "https://x/k"}, "issuers[0].jwks_uri", "one key source"),
    ({**BASE, "jwks_uri": "http://keys.example.org/jwks"}, "issuers[0].jwks_uri", "https"),
    ({**BASE, "leeway": "forever"}, "issuers[0].leeway", "duration"),
    ({**BASE, "leeway": "1h"}, "issuers[0].leeway", "at most"),
    ({**BASE, "max_token_bytes": 10}, "issuers[0].max_token_bytes", "between"),
    ({**BASE, "require_sender_constraint": "yes"}, "issuers[0].require_sender_constraint", "true or false"),
    ({**BASE, "typ": 7}, "issuers[0].typ", "media type"),
    ({**BASE, "audience": ["x"]}, "issuers[0].audience", "did you mean 'audiences'"),
    ({**BASE, "refresh": {"max_stale": "x"}}, "issuers[0].refresh.max_stale", "duration"),
    ({**BASE, "refresh": {"stale": "1h"}}, "issuers[0].refresh.stale", "unknown key"),
    ({**BASE, "refresh": {"min_max_age": "2h", "max_max_age": "1h"}}, "issuers[0].refresh.min_max_age", "exceed"),
    ("https://idp.example.org", "issuers[0]", "mapping"),
])
def test_mistakes_name_the_key(data: Any, key: str, words: str) -> None:
    error = config_error(data)
    assert error.key == key and words in error.message, error


def test_http_is_allowed_to_loopback_only() -> None:
    for host in ("127.0.0.1:9400", "localhost:9400", "[::1]:9400"):
        IssuerConfig.from_mapping({**BASE, "issuer": f"http://{host}"}, "issuers[0]")


def test_issuer_listed_twice() -> None:
    error = config_error([BASE, {**BASE, "audiences": ["other"]}])
    assert error.key == "issuers[1].issuer" and "twice" in error.message
    with pytest.raises(ConfigError) as caught:
        parse_issuers({"issuer": BASE["issuer"]})
    assert caught.value.key == "issuers" and "list" in caught.value.message


def test_relative_files_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "idp.jwks.json").write_text(json.dumps(issuer_jwks()))
    config = IssuerConfig.from_mapping({**BASE, "jwks_file": "keys/idp.jwks.json"}, "issuers[0]",
                                       base_dir=str(tmp_path))
    assert config.jwks_file == str(tmp_path / "keys" / "idp.jwks.json")
    assert IssuerRegistry([config]).status()[0].keys == 2


def test_unreadable_or_bad_key_files_stop_the_start(tmp_path: Path) -> None:
    missing = IssuerConfig.from_mapping({**BASE, "jwks_file": str(tmp_path / "nope.json")}, "issuers[0]")
    with pytest.raises(ConfigError) as caught:
        IssuerRegistry([missing])
    assert caught.value.key == "issuers[0].jwks_file" and "cannot read" in caught.value.message
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "oct", "k": "AAAA"}]}')
    bad = IssuerConfig.from_mapping({**BASE, "jwks_file": str(tmp_path / "bad.json")}, "issuers[0]")
    with pytest.raises(ConfigError) as caught:
        IssuerRegistry([bad])
    assert "no usable key" in caught.value.message
    (tmp_path / "short.secret").write_text(b64url_encode(b"short") + "\n")
    short = IssuerConfig.from_mapping({**BASE, "algorithms": ["HS256"], "shared_secret_file": str(tmp_path / "short.secret")},
                                      "issuers[0]")
    with pytest.raises(ConfigError) as caught:
        IssuerRegistry([short])
    assert caught.value.key == "issuers[0].shared_secret_file" and "at least 32" in caught.value.message


@pytest.mark.parametrize("header, seconds", [
    ("public, max-age=600", 600.0), ("max-age=0", 0.0), ("no-store", 0.0), ("private, no-cache", 0.0),
    ('max-age="120"', 120.0), ("s-maxage=5", None), ("", None), (None, None),
])
def test_cache_control_max_age(header: str | None, seconds: float | None) -> None:
    assert cache_max_age(header) == seconds


def test_freshness_is_clamped() -> None:
    settings = RefreshSettings(default_max_age=300, min_max_age=60, max_max_age=3600)
    assert [settings.freshness(v) for v in (None, 0, 59, 600, 10**9)] == [300, 60, 60, 600, 3600]


async def test_held_keys_replace_the_configured_source() -> None:
    from tests.support.jwt import issuer_keyset, issuer_token

    config = IssuerConfig(issuer="https://idp.test", audiences=("orders-api",), key="exchange")
    registry = IssuerRegistry([config], held_keys={"https://idp.test": issuer_keyset()}, clock=lambda: 1_750_000_000)
    verified = await registry.validate(issuer_token(1_750_000_000), now=1_750_000_000)
    assert verified.subject == "alice"
    status = registry.status()[0]
    assert status.source.startswith("held by this process") and status.available and not status.stale
    await registry.close()
