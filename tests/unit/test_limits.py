"""The ``limits`` config key: defaults, every key read and checked, and the bound on a whole
CheckRequest that lets one over it be refused before it is parsed."""

from __future__ import annotations

import pytest

from authz_server.config import config_from_mapping
from authz_server.envoy import check_request_from_json, parse_check_request
from authz_server.errors import ConfigError, RequestError
from authz_server.limits import Limits


def test_defaults_and_every_key() -> None:
    assert config_from_mapping({}).limits == Limits()
    read = config_from_mapping({"limits": {
        "max_header_bytes": 96 * 1024, "max_headers": 300, "max_body_bytes": 8192, "header_timeout": "5s",
        "body_timeout": "1m", "idle_timeout": "90s", "max_connections": 500}}).limits
    assert read == Limits(max_header_bytes=96 * 1024, max_headers=300, max_body_bytes=8192, header_timeout=5.0,
                          body_timeout=60.0, idle_timeout=90.0, max_connections=500)
    assert read.max_request_bytes == 96 * 1024 + 8192 + 64 * 1024


@pytest.mark.parametrize(("limits", "key"), [
    ({"max_body_byte": 1}, "limits.max_body_byte"),
    ({"max_headers": 0}, "limits.max_headers"),
    ({"max_header_bytes": "64k"}, "limits.max_header_bytes"),
    ({"header_timeout": "0s"}, "limits.header_timeout"),
    ({"idle_timeout": "forever"}, "limits.idle_timeout"),
])
def test_a_bad_value_names_its_key(limits: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"limits": limits})
    assert caught.value.key == key


def test_a_check_request_is_held_to_the_limits() -> None:
    def request(headers: dict[str, str], body: str = "") -> bytes:
        http = {"method": "POST", "path": "/p", "headers": headers, **({"body": body} if body else {})}
        return check_request_from_json({"attributes": {"request": {"http": http}}}).SerializeToString()

    small = Limits(max_header_bytes=1024, max_headers=4, max_body_bytes=100)
    parse_check_request(request({"a": "1" * 500}, "b" * 100), small)
    for raw, code in ((request({"a": "1" * 1100}), "request_too_large"),
                      (request({str(i): "" for i in range(5)}), "request_too_large"),
                      (request({}, "b" * 101), "body_too_large"),
                      (b"\x0a" * (small.max_request_bytes + 1), "request_too_large")):
        with pytest.raises(RequestError) as caught:
            parse_check_request(raw, small)
        assert caught.value.code == code
