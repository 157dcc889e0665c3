"""Where an issuer's keys come from: a file, a shared secret, keys this process holds, a JWKS
URL, or OpenID Connect Discovery (whose metadata also names the endpoints introspection and
browser sign-in use). Each implements ``jwks.KeySource``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import httpx

from ..errors import ConfigError
from .configread import url as _url
from .encoding import b64url_decode, json_object
from .jose import JwkError, JwkSet, load_jwks, parse_jwks
from .jwks import FetchedDocument, FetchError, JwksFetcher


class FileKeySource:
    static = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = f"file {path}"

    def read(self) -> JwkSet:
        return load_jwks(self.path)

    async def load(self) -> tuple[JwkSet, float | None]:
        return self.read(), None


class SecretKeySource:
    static = True

    def __init__(self, path: str, algorithms: tuple[str, ...]) -> None:
        self.path = path
        self.algorithms = algorithms
        self.description = f"shared secret {path}"

    def read(self) -> JwkSet:
        """The file holds the secret base64url-encoded (as a JWK's ``k``), surrounding whitespace ignored."""
        try:
            text = Path(self.path).read_text().strip()
        except OSError as exc:
            raise JwkError(f"cannot read {self.path!r}: {exc.strerror}") from None
        try:
            secret = b64url_decode(text)
        except ValueError as exc:
            raise JwkError(f"{self.path}: the secret must be base64url text: {exc}") from None
        alg = self.algorithms[0] if len(self.algorithms) == 1 else None
        return JwkSet.shared_secret(secret, alg=alg)

    async def load(self) -> tuple[JwkSet, float | None]:
        return self.read(), None


class HeldKeySource:
    """A key set this process holds itself (e.g. its own token-exchange issuer's public keys)."""

    static = True

    def __init__(self, keys: JwkSet, description: str) -> None:
        self.keys = keys
        self.description = description

    def read(self) -> JwkSet:
        return self.keys

    async def load(self) -> tuple[JwkSet, float | None]:
        return self.keys, None


class UriKeySource:
    static = False

    def __init__(self, jwks_uri: str, fetcher: JwksFetcher) -> None:
        self.jwks_uri = jwks_uri
        self.fetcher = fetcher
        self.description = f"jwks_uri {jwks_uri}"

    async def load(self) -> tuple[JwkSet, float | None]:
        document = await self.fetcher.fetch(self.jwks_uri)
        return parse_jwks(document.body), document.max_age


class DiscoveryKeySource:
    """OpenID Connect Discovery: the metadata names ``jwks_uri``; the metadata's ``issuer`` must
    be exactly ours (Discovery §4.3), or the document is refused."""

    static = False

    def __init__(self, discovery_url: str, issuer: str, fetcher: JwksFetcher) -> None:
        self.discovery_url = discovery_url
        self.issuer = issuer
        self.fetcher = fetcher
        self.jwks_uri: str | None = None
        self.metadata: Mapping[str, Any] | None = None  # the last good provider metadata
        self.description = f"discovery {discovery_url}"

    async def provider_metadata(self) -> Mapping[str, Any]:
        """The provider's metadata (endpoints for introspection and browser sign-in): fetched
        once, and again whenever the keys are discovered again."""
        if self.metadata is None:
            self.metadata = await fetch_metadata(self.fetcher, self.discovery_url, self.issuer)
        return self.metadata

    async def _discover(self) -> str:
        metadata = self.metadata = await fetch_metadata(self.fetcher, self.discovery_url, self.issuer)
        jwks_uri = metadata.get("jwks_uri")
        try:
            return _url(jwks_uri, "jwks_uri", what="jwks_uri")
        except ConfigError as exc:
            raise FetchError(f"{self.discovery_url}: {exc.message}") from None

    async def load(self) -> tuple[JwkSet, float | None]:
        if self.jwks_uri is None:
            self.jwks_uri = await self._discover()
        try:
            document = await self.fetcher.fetch(self.jwks_uri)
            return parse_jwks(document.body), document.max_age
        except (FetchError, JwkError):
            self.jwks_uri = None  # the provider may have moved its keys: discover again next time
            raise


async def fetch_metadata(fetcher: JwksFetcher, discovery_url: str, issuer: str) -> Mapping[str, Any]:
    """A provider's metadata document, whose ``issuer`` must be exactly ours, or ``FetchError``."""
    document = await fetcher.fetch(discovery_url)
    try:
        metadata = json_object(document.body)
    except ValueError as exc:
        raise FetchError(f"{discovery_url}: not a metadata document: {exc}") from None
    if metadata.get("issuer") != issuer:
        # Discovery §4.3: "The issuer value returned MUST be identical to the Issuer URL that
        # was used as the prefix to /.well-known/openid-configuration to retrieve the
        # configuration information."
        raise FetchError(f"{discovery_url}: metadata issuer {str(metadata.get('issuer'))[:100]!r} "
                         f"is not {issuer!r}")
    return metadata


class ClientFetcher:
    """``JwksFetcher`` over a shared client (metadata of issuers whose keys come from elsewhere)."""

    def __init__(self, client: httpx.AsyncClient, max_bytes: int) -> None:
        self._client, self._max_bytes = client, max_bytes

    async def fetch(self, url: str) -> FetchedDocument:
        try:
            response = await self._client.get(url, headers={"accept": "application/json"})
        except httpx.HTTPError as exc:
            raise FetchError(f"GET {url}: {type(exc).__name__}") from None
        if response.status_code != 200 or len(response.content) > self._max_bytes:
            raise FetchError(f"GET {url}: HTTP {response.status_code}")
        return FetchedDocument(response.content)
