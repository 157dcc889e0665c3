"""Threat-intelligence lists: IPs and CIDRs, SPIFFE IDs (or whole trust domains), subjects
and token ``jti``s, each entry with an optional reason.

A list comes from a file (or, in production, an http(s) URL, fetched periodically) in one of
two forms:

* text, one entry per line, ``#`` starts a comment, ``entry  reason…`` after whitespace.
  The kind is read from the entry: an IP or CIDR; ``spiffe://…`` (``spiffe://domain/*`` for a
  whole trust domain); ``sub:<subject>``; ``jti:<token id>``;
* YAML or JSON: ``{entries: [{kind: ip|spiffe_id|subject|jti, value: …, reason: …}]}``.

Files are re-read when they change (checked a few times a second by ``watch``); a list that
fails to parse keeps the last good entries and reports the error. Lookups are set lookups;
CIDRs are grouped by prefix length, so an address costs one set lookup per distinct length.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

log = logging.getLogger("authz_server.signals.threat")

KINDS = ("ip", "spiffe_id", "subject", "jti")


@dataclass(frozen=True, slots=True)
class ThreatSource:
    name: str
    path: str = ""
    url: str = ""
    refresh: float = 60.0  # URL lists only


class ListError(ValueError):
    pass


@dataclass
class _Entries:
    ips: dict[int, dict[int, tuple[str, str]]] = field(default_factory=dict)  # version*1000+prefix -> net -> (v, r)
    spiffe_ids: dict[str, str] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)
    subjects: dict[str, str] = field(default_factory=dict)
    jtis: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, value: str, reason: str, where: str) -> None:
        if kind == "ip":
            try:
                network = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ListError(f"{where}: {value!r} is not an IP address or CIDR") from None
            table = self.ips.setdefault(network.version * 1000 + network.prefixlen, {})
            table[int(network.network_address)] = (str(network), reason)
        elif kind == "spiffe_id":
            if not value.startswith("spiffe://"):
                raise ListError(f"{where}: {value!r} is not a SPIFFE ID")
            if value.endswith("/*"):
                self.domains[value[len("spiffe://"):-2]] = reason
            else:
                self.spiffe_ids[value] = reason
        elif kind == "subject":
            self.subjects[value] = reason
        elif kind == "jti":
            self.jtis[value] = reason
        else:
            raise ListError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")

    def count(self) -> int:
        return (sum(len(t) for t in self.ips.values()) + len(self.spiffe_ids) + len(self.domains)
                + len(self.subjects) + len(self.jtis))


def parse_list(text: str, where: str) -> _Entries:
    entries = _Entries()
    stripped = text.lstrip()
    if stripped.startswith(("{", "entries:")) or where.endswith((".json", ".yaml", ".yml")):
        try:
            document = json.loads(text) if stripped.startswith("{") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ListError(f"{where}: cannot parse: {str(exc).splitlines()[0]}") from None
        items = document.get("entries") if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise ListError(f"{where}: expected an 'entries' list")
        for index, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("value"), str):
                raise ListError(f"{where}: entries[{index}] needs a string 'value'")
            entries.add(str(item.get("kind", _kind_of(item["value"]))), _strip_prefix(item["value"]),
                        str(item.get("reason", "")), f"{where}: entries[{index}]")
        return entries
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        value, _, reason = line.partition(" ")
        entries.add(_kind_of(value), _strip_prefix(value), reason.strip(), f"{where}:{number}")
    return entries


def _kind_of(value: str) -> str:
    if value.startswith("spiffe://"):
        return "spiffe_id"
    if value.startswith("sub:"):
        return "subject"
    if value.startswith("jti:"):
        return "jti"
    return "ip"


def _strip_prefix(value: str) -> str:
    for prefix in ("sub:", "jti:"):
        if value.startswith(prefix):
            return value[len(prefix):]
    return value


class ThreatIntel:
    def __init__(self, sources: Iterable[ThreatSource]) -> None:
        self.sources = tuple(sources)
        self._lists: dict[str, _Entries] = {}
        self._stamps: dict[str, tuple[int, int]] = {}
        self.errors: dict[str, str] = {}
        self.generation = 0  # bumped on every successful (re)load
        self.reloaded = asyncio.Event()
        self._ip_cache: dict[str, list[dict[str, str]]] = {}
        for source in self.sources:
            if source.path:
                self._load_file(source, initial=True)

    # -- loading
    def _load_file(self, source: ThreatSource, *, initial: bool = False) -> bool:
        path = Path(source.path)
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._stamps.get(source.name) == stamp:
                return False
            text = path.read_text()
        except OSError as exc:
            return self._failed(source, f"{source.path}: {exc.strerror}", initial)
        try:
            entries = parse_list(text, source.path)
        except ListError as exc:
            self._stamps[source.name] = stamp  # do not re-parse the same broken file every poll
            return self._failed(source, str(exc), initial)
        self._stamps[source.name] = stamp
        self._install(source, entries)
        return True

    def _failed(self, source: ThreatSource, message: str, initial: bool) -> bool:
        self.errors[source.name] = message
        kept = self._lists.get(source.name)
        log.error("threat list %s not loaded (%s); %s", source.name, message,
                  f"keeping its {kept.count()} last good entries" if kept else "it is empty")
        if initial and source.name not in self._lists:
            self._lists[source.name] = _Entries()
        return False

    def _install(self, source: ThreatSource, entries: _Entries) -> None:
        self._lists[source.name] = entries
        self.errors.pop(source.name, None)
        self._ip_cache.clear()
        self.generation += 1
        self.reloaded.set()
        log.info("threat list %s: %d entries", source.name, entries.count())

    def load_text(self, name: str, text: str) -> None:
        """Install a list given as text (URL fetches; tests). Raises ``ListError``."""
        self._install(ThreatSource(name), parse_list(text, name))

    async def watch(self, interval: float = 0.25) -> None:
        """Re-read changed files (and URLs on their own schedule) until cancelled."""
        elapsed: dict[str, float] = {}
        while True:
            await asyncio.sleep(interval)
            for source in self.sources:
                if source.path:
                    self._load_file(source)
                elif source.url:
                    elapsed[source.name] = elapsed.get(source.name, source.refresh) + interval
                    if elapsed[source.name] >= source.refresh:
                        elapsed[source.name] = 0.0
                        await self._fetch(source)

    async def _fetch(self, source: ThreatSource) -> None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                answer = await client.get(source.url)
                answer.raise_for_status()
            self.load_text(source.name, answer.text)
        except (httpx.HTTPError, ListError) as exc:
            self._failed(source, f"{source.url}: {exc}", False)

    # -- lookups
    def _ip(self, address: str) -> list[dict[str, str]]:
        cached = self._ip_cache.get(address)
        if cached is not None:
            return cached
        found: list[dict[str, str]] = []
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if ip is not None:
            value = int(ip)
            bits = 32 if ip.version == 4 else 128
            for name, entries in self._lists.items():
                for key, table in entries.ips.items():
                    version, prefix = divmod(key, 1000)
                    if version != ip.version:
                        continue
                    network = (value >> (bits - prefix)) << (bits - prefix) if prefix else 0
                    hit = table.get(network)
                    if hit is not None:
                        found.append({"list": name, "kind": "ip", "value": hit[0], "reason": hit[1]})
        if len(self._ip_cache) >= 50_000:
            self._ip_cache.clear()
        self._ip_cache[address] = found
        return found

    def lookup(self, *, ip: str = "", spiffe_id: str = "", subject: str = "", jti: str = "") -> dict[str, Any]:
        matches: list[dict[str, str]] = list(self._ip(ip)) if ip else []
        for name, entries in self._lists.items():
            if spiffe_id:
                if spiffe_id in entries.spiffe_ids:
                    matches.append({"list": name, "kind": "spiffe_id", "value": spiffe_id,
                                    "reason": entries.spiffe_ids[spiffe_id]})
                domain = spiffe_id[len("spiffe://"):].split("/", 1)[0]
                if domain in entries.domains:
                    matches.append({"list": name, "kind": "spiffe_id", "value": f"spiffe://{domain}/*",
                                    "reason": entries.domains[domain]})
            if subject and subject in entries.subjects:
                matches.append({"list": name, "kind": "subject", "value": subject, "reason": entries.subjects[subject]})
            if jti and jti in entries.jtis:
                matches.append({"list": name, "kind": "jti", "value": jti, "reason": entries.jtis[jti]})
        return {"listed": bool(matches), "matches": matches}

    def status(self) -> dict[str, Any]:
        return {name: {"entries": entries.count(), "error": self.errors.get(name, "")}
                for name, entries in self._lists.items()}


__all__ = ["ListError", "ThreatIntel", "ThreatSource", "parse_list"]
