"""Where the state replicas share lives: one Redis, a primary watched by Redis Sentinel, or a Redis Cluster.

The URL forms, accepted wherever a ``redis://`` URL is (``sessions.store``, ``signals.rate.store``,
``signals.anomaly.store``)::

    redis://[[user]:password@]host:port/DB            rediss://... (TLS), unix:///path/redis.sock?db=DB
    redis+sentinel://[[user]:password@]h1:26379,h2:26379/SERVICE/DB     (rediss+sentinel://: TLS)
    redis+cluster://[[user]:password@]h1:7000,h2:7001/                   (rediss+cluster://: TLS)

Each is served by redis-py's own client for it (``Redis``, ``Sentinel.master_for``,
``RedisCluster``): master discovery, failover and slot routing are theirs, not ours. The user
and password are the data nodes'; sentinels are asked without credentials.

``replica_acks=N`` (a query parameter on any form; default 1 with Sentinel, else 0) makes the
writes that must survive a failover (``durable``) wait until N replicas have them (``WAIT``):
Redis replicates asynchronously, and a write acknowledged only by a primary that dies the
next moment is gone. With N >= 1 a write counts only once a replica holds it, so a Sentinel
failover (which promotes the most up-to-date replica) keeps it. Still not a consensus
guarantee: a failover that promotes a replica that had not received it, or a whole
group restarting without persistence, loses it.

Cluster keys: every multi-key operation keeps its keys in one hash slot with a hash tag
(``{...}``, see ``tag``). Pub/sub on a cluster is sharded (``SPUBLISH``/``SSUBSCRIBE``,
Redis 7.0 and later): a channel lives on the shard that owns its slot and messages never
cross the cluster bus. Servers before 7.0 have no sharded pub/sub; there the cluster
client falls back to ``PUBLISH``/``SUBSCRIBE``, which Redis Cluster broadcasts to every
node (``sharded_pubsub=no`` forces that).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigError

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
OUR_PARAMETERS = ("replica_acks", "sharded_pubsub")


class NotReplicated(RedisError):
    """A durable write reached the primary but not enough replicas in time: it could be lost."""


@dataclass(frozen=True, slots=True)
class StoreLocation:
    """A parsed shared-state URL. ``text`` is what was configured (for messages: its password
    is never printed, see ``redacted``)."""

    kind: str  # "redis" | "sentinel" | "cluster"
    text: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    replica_acks: int = 0
    sharded_pubsub: bool = True
    plain_url: str = ""  # kind "redis": the URL for redis-py, without our parameters

    @property
    def redacted(self) -> str:
        return redact(self.text)


def redact(text: str) -> str:
    """The URL with any password in it replaced, for messages and logs."""
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", text, count=1)


def is_store_url(text: str) -> bool:
    return text.split("://", 1)[0] in (*PLAIN_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES) and "://" in text


def parse_store_url(text: str, *, key: str) -> StoreLocation:
    """A shared-state URL → ``StoreLocation``; ``ConfigError`` naming ``key`` when it is not one."""
    if not isinstance(text, str) or not is_store_url(text):
        shown = redact(text) if isinstance(text, str) else text
        raise ConfigError(f"expected memory, redis://, redis+sentinel://H:P,.../SERVICE/DB or "
                          f"redis+cluster://H:P,.../, got {shown!r}"[:200], key=key)
    scheme, _, rest = text.partition("://")
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    ours = {name: params.pop(name) for name in OUR_PARAMETERS if name in params}
    sentinel = scheme in SENTINEL_SCHEMES
    acks = _whole(ours.get("replica_acks", "1" if sentinel else "0"), "replica_acks", key)
    sharded_text = ours.get("sharded_pubsub", "yes")
    if sharded_text not in ("yes", "no"):
        raise ConfigError(f"sharded_pubsub must be yes or no, got {sharded_text!r}", key=key)
    sharded = sharded_text == "yes"
    if scheme in PLAIN_SCHEMES:
        plain = text.split("?", 1)[0] + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")
        try:
            redis.connection.parse_url(plain)
        except ValueError as exc:
            raise ConfigError(f"not a usable redis URL: {exc}", key=key) from None
        return StoreLocation("redis", text, replica_acks=acks, plain_url=plain)
    if params:
        raise ConfigError(f"unknown query parameter {next(iter(params))!r}; this form takes "
                          f"{', '.join(OUR_PARAMETERS)}", key=key)
    username, password, hosts = _userinfo(netloc)
    nodes = tuple(_host_port(item, key) for item in hosts.split(",") if item.strip())
    if not nodes:
        raise ConfigError("name at least one host:port", key=key)
    parts = [unquote(p) for p in path.split("/") if p]
    tls = scheme.startswith("rediss")
    if sentinel:
        if not parts or len(parts) > 2:
            raise ConfigError("expected redis+sentinel://HOST:PORT,.../SERVICE/DB (the service name sentinels "
                              "monitor, then the database number)", key=key)
        db = _whole(parts[1], "the database", key) if len(parts) == 2 else 0
        return StoreLocation("sentinel", text, nodes, parts[0], db, username, password, tls, acks, sharded)
    if parts and parts != ["0"]:
        raise ConfigError("a Redis Cluster has only database 0: expected redis+cluster://HOST:PORT,.../", key=key)
    return StoreLocation("cluster", text, nodes, "", 0, username, password, tls, acks, sharded)


def _whole(value: str, what: str, key: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{what}: expected a whole number >= 0, got {value!r}", key=key)
    return int(value)


def _userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    if "@" not in netloc:
        return None, None, netloc
    info, _, hosts = netloc.rpartition("@")
    user, sep, password = info.partition(":")
    return (unquote(user) or None), (unquote(password) if sep else None), hosts


def _host_port(item: str, key: str) -> tuple[str, int]:
    parsed = urlsplit(f"//{item.strip()}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise ConfigError(f"expected host:port, got {item.strip()!r}", key=key)
    return parsed.hostname, port


def tag(text: str) -> str:
    """``{text}`` as a hash tag: Redis Cluster hashes only what is between the first ``{`` and the
    next ``}``, so keys sharing a tag share a slot. Braces inside ``text`` would end the tag early
    (still the same slot for the same text, but a different one from the key's other parts):
    they are replaced, the tag only routes."""
    return "{" + text.replace("{", "(").replace("}", ")") + "}"


class Subscription:
    """One channel of invalidation messages. ``next`` returns ``("subscribed", None)`` each time
    the subscription is (re)established (anything published before may have been missed),
    ``("message", data)``, ``("lost", None)`` when the server dropped it, or None on timeout;
    connection errors raise ``RedisError``/``OSError``."""

    def __init__(self, pubsub: Any, channel: str, sharded: bool) -> None:
        self._pubsub = pubsub
        self._channel = channel
        self._sharded = sharded

    async def start(self) -> None:
        if self._sharded:
            await self._pubsub.ssubscribe(self._channel)
        else:
            await self._pubsub.subscribe(self._channel)

    async def next(self, timeout: float) -> tuple[str, Any] | None:
        if self._sharded:
            message = await self._pubsub.get_sharded_message(ignore_subscribe_messages=False, timeout=timeout)
        else:
            message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=timeout)
        if message is None:
            return None
        kind = message.get("type")
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind in ("subscribe", "ssubscribe"):
            return "subscribed", None
        if kind in ("unsubscribe", "sunsubscribe"):
            return "lost", None
        return "message", message.get("data")

    async def close(self) -> None:
        try:
            await self._pubsub.aclose()
        except (RedisError, OSError, RuntimeError):
            pass


class SharedRedis:
    """A client for one ``StoreLocation``: commands, durable writes, publish and subscribe.

    ``client`` is redis-py's own (``Redis`` or ``RedisCluster``); use it for plain commands.
    Socket timeouts are short: the hot path fails closed within ``timeout`` instead of waiting."""

    def __init__(self, location: StoreLocation, *, timeout: float = 0.25) -> None:
        self.location = location
        self.kind = location.kind
        self.timeout = timeout
        common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        # One immediate retry on a broken connection: after Redis restarts or fails over,
        # pooled connections are stale and the first command on each would fail although
        # the store is back.
        retry = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
        self._sentinel: Sentinel | None = None
        self.client: Any
        if location.kind == "redis":
            self.client = redis.Redis.from_url(location.plain_url, **common, **retry, health_check_interval=0)
        elif location.kind == "sentinel":
            credentials = {"username": location.username, "password": location.password, "ssl": location.tls}
            self._sentinel = Sentinel(list(location.nodes), sentinel_kwargs={**common, "ssl": location.tls})
            self.client = self._sentinel.master_for(location.service, db=location.db, **common, **retry,
                                                    **credentials)
        else:
            self.client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in location.nodes],
                                       username=location.username, password=location.password, ssl=location.tls,
                                       retry=Retry(NoBackoff(), 1), **common)
        self._cluster_sharded: bool | None = None  # learnt at the first publish/subscribe

    @property
    def replica_acks(self) -> int:
        return self.location.replica_acks

    async def durable(self, key: str, *commands: tuple[Any, ...]) -> list[Any]:
        """Run ``commands`` (each the arguments of one command) on the node serving ``key``;
        then, when ``replica_acks`` is set, ``WAIT`` on that same connection until that many
        replicas have them (``NotReplicated`` when they do not within the timeout). Returns the
        commands' replies."""
        acks = self.replica_acks
        if not acks and len(commands) == 1:
            return [await self.client.execute_command(*commands[0])]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        # WAIT gives up well inside the socket timeout, so its answer (how many did) arrives.
        wait_ms = max(1, int(self.timeout * 500))
        if acks:
            if self.kind == "cluster":
                pipe.execute_command("WAIT", acks, wait_ms, target_nodes=self.client.get_node_from_key(key))
            else:
                pipe.execute_command("WAIT", acks, wait_ms)
        replies = await pipe.execute()
        if acks:
            reached = int(replies.pop())
            if reached < acks:
                raise NotReplicated(f"{reached} of {acks} replicas acknowledged the write within {wait_ms} ms")
        return list(replies)

    async def _sharded(self) -> bool:
        if self.kind != "cluster":
            return False
        if self._cluster_sharded is None:
            self._cluster_sharded = self.location.sharded_pubsub and await self._server_has_sharded_pubsub()
        return self._cluster_sharded

    async def _server_has_sharded_pubsub(self) -> bool:
        try:
            await self.client.execute_command("PUBSUB", "SHARDCHANNELS", target_nodes=RedisCluster.RANDOM)
            return True
        except ResponseError:  # "unknown subcommand": before Redis 7.0
            return False

    async def publish(self, channel: str, message: str) -> None:
        if await self._sharded():
            await self.client.spublish(channel, message)
        else:
            await self.client.publish(channel, message)

    async def subscription(self, channel: str) -> Subscription:
        sharded = await self._sharded()
        return Subscription(self.client.pubsub(), channel, sharded)

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()


def connect(url: str, *, timeout: float = 0.25, key: str = "store") -> SharedRedis:
    return SharedRedis(parse_store_url(url, key=key), timeout=timeout)


STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

__all__ = ["NotReplicated", "STORE_ERRORS", "SharedRedis", "StoreLocation", "Subscription", "connect",
           "is_store_url", "parse_store_url", "tag"]
