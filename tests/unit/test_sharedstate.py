"""Shared-state URLs: every form DESIGN names, and clear errors naming the key for the rest."""

from __future__ import annotations

import pytest

from authz_server.config import config_from_mapping
from authz_server.errors import ConfigError
from authz_server.sharedstate import parse_store_url, tag


def test_sentinel_url_names_sentinels_service_and_database() -> None:
    location = parse_store_url("redis+sentinel://s1:26379,s2:26380,10.0.0.3:26381/authz/2", key="k")
    assert location.kind == "sentinel"
    assert location.nodes == (("s1", 26379), ("s2", 26380), ("10.0.0.3", 26381))
    assert (location.service, location.db, location.tls) == ("authz", 2, False)
    assert location.replica_acks == 1  # a failover must not lose what a sign-in was told
    assert parse_store_url("redis+sentinel://s1:26379/authz", key="k").db == 0
    assert parse_store_url("rediss+sentinel://s1:26379/authz/0?replica_acks=2", key="k").replica_acks == 2
    assert parse_store_url("rediss+sentinel://s1:26379/authz/0", key="k").tls


def test_cluster_url_names_seed_nodes() -> None:
    location = parse_store_url("redis+cluster://:secret@c1:7000,c2:7001/", key="k")
    assert location.kind == "cluster" and location.nodes == (("c1", 7000), ("c2", 7001))
    assert (location.username, location.password, location.replica_acks) == (None, "secret", 0)
    assert location.redacted == "redis+cluster://:***@c1:7000,c2:7001/"
    assert parse_store_url("redis+cluster://[::1]:7000", key="k").nodes == (("::1", 7000),)
    assert not parse_store_url("redis+cluster://c1:7000/?sharded_pubsub=no", key="k").sharded_pubsub


def test_a_password_never_reaches_a_message() -> None:
    with pytest.raises(ConfigError) as bad:
        parse_store_url("http://user:hunter2@r:6379/0", key="sessions.store")
    assert "hunter2" not in bad.value.message and "user:***@" in bad.value.message
    location = parse_store_url("redis+sentinel://s:pw@h:1/authz/0", key="k")
    assert location.redacted == "redis+sentinel://s:***@h:1/authz/0"


def test_plain_urls_keep_redis_py_parameters() -> None:
    location = parse_store_url("redis://r:6379/1?replica_acks=1&health_check_interval=2", key="k")
    assert location.kind == "redis" and location.replica_acks == 1
    assert location.plain_url == "redis://r:6379/1?health_check_interval=2"
    assert parse_store_url("unix:///run/redis.sock?db=3", key="k").plain_url == "unix:///run/redis.sock?db=3"


@pytest.mark.parametrize(("url", "message"), [
    ("http://r:6379", "expected memory, redis://"),
    ("redis+sentinel://s1:26379", "SERVICE/DB"),
    ("redis+sentinel://s1:26379/a/b/c", "SERVICE/DB"),
    ("redis+sentinel://s1:26379/authz/x", "whole number"),
    ("redis+sentinel://s1/authz/0", "expected host:port"),
    ("redis+cluster://c1:7000/3", "only database 0"),
    ("redis+cluster:///", "at least one host:port"),
    ("redis+cluster://c1:7000/?timeout=1", "unknown query parameter 'timeout'"),
    ("redis+cluster://c1:7000/?replica_acks=-1", "whole number"),
    ("redis+cluster://c1:7000/?sharded_pubsub=maybe", "yes or no"),
])
def test_bad_urls_say_what_is_expected(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as bad:
        parse_store_url(url, key="sessions.store")
    assert message in bad.value.message and bad.value.key == "sessions.store"


@pytest.mark.parametrize("key", ["sessions.store", "signals.rate.store", "signals.anomaly.store"])
def test_every_store_key_takes_the_ha_forms_and_names_itself_on_error(key: str) -> None:
    def config(url: object) -> dict:
        section, name = key.rsplit(".", 1)
        tree: dict = {name: url}
        for part in reversed(section.split(".")):
            tree = {part: tree}
        return tree

    for url in ("redis+sentinel://s1:26379,s2:26379/authz/0", "redis+cluster://c1:7000,c2:7001/", "memory"):
        config_from_mapping(config(url))
    for bad in ("redis+sentinel://s1:26379", 7):
        with pytest.raises(ConfigError) as error:
            config_from_mapping(config(bad))
        assert error.value.key == key


def test_tags_route_only_by_their_text() -> None:
    assert tag("alice") == "{alice}"
    assert tag("user:https://idp|{x}") == "{user:https://idp|(x)}"  # braces would end the tag early
