"""The second wave's identity config: browser_login, issuers[].dpop, issuers[].introspection.
Each bad value stops the start with one error naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from authz_server.config import config_from_mapping
from authz_server.errors import ConfigError
from authz_server.identity.dpop import NonceSource, normalize_htu


def _config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    (tmp_path / "secret").write_text("s" * 32)
    issuer = {"issuer": "https://idp.test", "audiences": ["orders"], "jwks_file": str(tmp_path / "jwks.json")}
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    data: dict[str, Any] = {"issuers": [issuer],
                            "browser_login": {"issuer": "https://idp.test", "client_id": "authz-server",
                                              "client_secret_file": str(tmp_path / "secret")}}
    for key, value in changes.items():
        if key.startswith("issuer_"):
            issuer[key[len("issuer_"):]] = value
        elif key.startswith("login_"):
            data["browser_login"][key[len("login_"):]] = value
        else:
            data[key] = value
    return data


def test_a_good_configuration_reads(tmp_path: Path) -> None:
    config = config_from_mapping(_config(tmp_path, issuer_dpop={"mode": "required", "nonce": True},
                                         issuer_introspection={"client_id": "rs", "client_secret_file": "x",
                                                               "cache_ttl": "30s"}), base_dir=str(tmp_path))
    assert config.browser_login is not None and config.browser_login.callback_path == "/_authz/callback"
    issuer = config.issuers[0]
    assert issuer.dpop.mode == "required" and issuer.dpop.nonce and issuer.policy().dpop == "required"
    assert issuer.introspection is not None and issuer.introspection.cache_ttl == 30


@pytest.mark.parametrize("changes,key", [
    ({"login_issuer": "https://other.test"}, "browser_login.issuer"),
    ({"login_callback_path": "callback"}, "browser_login.callback_path"),
    ({"login_logout_path": "/_authz/callback"}, "browser_login.logout_path"),
    ({"login_scopes": ["profile"]}, "browser_login.scopes"),
    ({"login_private_key_jwt": "k.jwk"}, "browser_login"),
    ({"login_external_url": "https://shop.test/app"}, "browser_login.external_url"),
    ({"login_colour": "blue"}, "browser_login.colour"),
    ({"issuer_dpop": "sometimes"}, "issuers[0].dpop"),
    ({"issuer_dpop": {"mode": "allowed", "algorithms": ["HS256"]}}, "issuers[0].dpop.algorithms"),
    ({"issuer_dpop": {"mode": "allowed", "iat_window": "2h"}}, "issuers[0].dpop.iat_window"),
    ({"issuer_introspection": {"client_id": "rs"}}, "issuers[0].introspection.client_secret_file"),
    ({"issuer_introspection": {"client_id": "rs", "client_secret_file": "x", "jwt_response": "maybe"}},
     "issuers[0].introspection.jwt_response"),
    ({"sessions": {"enabled": False}}, "browser_login"),
])
def test_bad_values_name_their_key(tmp_path: Path, changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(_config(tmp_path, **changes), base_dir=str(tmp_path))
    assert caught.value.key == key, caught.value.message


def test_htu_is_compared_after_normalization() -> None:
    assert normalize_htu("HTTPS://API.Test:443/orders?x=1#f") == "https://api.test/orders"
    assert normalize_htu("http://api.test:8080") == "http://api.test:8080/"
    assert normalize_htu("api.test/orders") is None and normalize_htu("ftp://api.test/") is None


def test_nonces_are_valid_for_their_lifetime_on_every_replica_sharing_the_secret() -> None:
    one, two, stranger = NonceSource(b"k" * 32, 300), NonceSource(b"k" * 32, 300), NonceSource(b"x" * 32, 300)
    nonce = one.issue(1000.0)
    assert two.valid(nonce, 1100.0) and not two.valid(nonce, 1301.0) and not stranger.valid(nonce, 1000.0)
    assert not one.valid(nonce[:-1] + ("A" if nonce[-1] != "A" else "B"), 1000.0)
