"""The SPIFFE bundle endpoint, both ends: serving this issuer's bundles, fetching its partners'.

SPIFFE Federation: a trust domain publishes its bundle at a bundle endpoint URL, and a
federated partner fetches it from there, on the ``https_web`` profile "authenticated
using Web PKI" (an HTTPS server certificate from a CA the client trusts, not an SVID).
The document is the SPIFFE bundle (``bundle.py``: a JWK Set with ``spiffe_sequence`` and
``spiffe_refresh_hint``); a client "SHOULD" poll again after the refresh hint.

Serving (``bundle_endpoint: {addr, cert_file, key_file}``): ``GET /<trust domain>`` answers the
current bundle of each trust domain this issuer holds (404 for any other path).

Fetching (a ``federates_with`` entry with ``bundle_endpoint_url``): at start and then after
each bundle's refresh hint (the issuer's ``bundle_refresh_hint`` when the document has
none), without following redirects, reading at most 1 MiB. A fetch that fails, or brings a
document that does not parse, keeps the last good bundle and is retried sooner (1 s,
doubling up to the refresh interval).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Callable

import httpx

from ..http import HttpRequest, HttpResponse, serve_http
from .bundle import BundleError, TrustBundle, parse_spiffe_bundle
from .config import BundleEndpointConfig, RemotePartner

log = logging.getLogger(__name__)

MAX_BUNDLE_BYTES = 1024 * 1024
MIN_REFRESH = 1.0
MAX_REFRESH = 86400.0
FIRST_RETRY = 1.0


def bundle_endpoint_handler(bundle: Callable[[str], TrustBundle | None]) -> Callable[[HttpRequest], HttpResponse]:
    def handle(request: HttpRequest) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, [("allow", "GET, HEAD")])
        found = bundle(request.path.strip("/"))
        if found is None:
            return HttpResponse(404, [("content-type", "text/plain")], b"no such trust domain here\n")
        body = found.to_json()
        return HttpResponse(200, [("content-type", "application/json"), ("cache-control", "no-cache")],
                            b"" if request.method == "HEAD" else body)

    return handle


async def serve_bundle_endpoint(config: BundleEndpointConfig, bundle: Callable[[str], TrustBundle | None]
                                ) -> tuple[asyncio.Server, str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.cert_file, config.key_file)
    return await serve_http(bundle_endpoint_handler(bundle), config.addr, ssl=context)


class BundleFetcher:
    """Keeps one remote partner's bundle current; ``on_bundle`` gets each new document."""

    def __init__(self, partner: RemotePartner, on_bundle: Callable[[TrustBundle], None], *,
                 default_refresh: float, timeout: float = 10.0) -> None:
        self.partner = partner
        self._on_bundle = on_bundle
        self._default_refresh = default_refresh
        verify = ssl.create_default_context(cafile=partner.ca_file) if partner.ca_file else True
        self._client = httpx.AsyncClient(verify=verify, timeout=timeout, follow_redirects=False)
        self.fetches = 0
        self.failures = 0
        self.last_error = ""
        self.last_success = 0.0

    async def fetch(self) -> TrustBundle:
        """One fetch; raises ``BundleError`` (any failure, said plainly)."""
        url = self.partner.bundle_endpoint_url
        try:
            async with self._client.stream("GET", url, headers={"accept": "application/json"}) as answer:
                if answer.status_code != 200:
                    raise BundleError(f"{url} answered {answer.status_code}")
                body = b""
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BUNDLE_BYTES:
                        raise BundleError(f"{url} sent more than {MAX_BUNDLE_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise BundleError(f"cannot fetch {url}: {exc or type(exc).__name__}") from None
        return parse_spiffe_bundle(self.partner.trust_domain, body)

    def _next(self, bundle: TrustBundle) -> float:
        hint = bundle.refresh_hint if bundle.refresh_hint else self._default_refresh
        return min(max(hint, MIN_REFRESH), MAX_REFRESH)

    async def run(self) -> None:
        retry = FIRST_RETRY
        refresh = self._default_refresh
        while True:
            self.fetches += 1
            try:
                bundle = await self.fetch()
            except BundleError as exc:
                self.failures += 1
                self.last_error = str(exc)
                log.warning("federated bundle of %s not refreshed (keeping the last good one): %s; retrying in %.0fs",
                            self.partner.trust_domain, exc, retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, max(refresh, FIRST_RETRY))
                continue
            self.last_success = time.time()
            self.last_error = ""
            retry = FIRST_RETRY
            self._on_bundle(bundle)
            refresh = self._next(bundle)
            await asyncio.sleep(refresh)

    async def close(self) -> None:
        await self._client.aclose()
