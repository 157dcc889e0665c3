"""One configured ``services`` entry as an HTTP client: the control plane's only network code.

httpx does the HTTP; this module only turns OPA's service settings into an
``httpx.AsyncClient``: the base URL, fixed ``headers``, ``tls.ca_cert`` (with or without the
system roots), ``allow_insecure_tls``, a client certificate (``credentials.client_tls``) and a
bearer token (``credentials.bearer``: ``token``, or ``token_path`` read again for every
request, so a token rotated on disk is picked up as OPA does). Errors come out as
``ServiceError`` with the HTTP status when there is one.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import httpx

from ..errors import UnavailableError
from .config import ServiceConfig

USER_AGENT = "authz-server (OPA control-plane client)"


class ServiceError(UnavailableError):
    default_code = "service_unavailable"

    def __init__(self, message: str, *, http_status: int = 0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.http_status = http_status


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes


def ssl_context(config: ServiceConfig) -> ssl.SSLContext | bool:
    if not config.url.startswith("https://"):
        return True
    if config.allow_insecure_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif config.ca_cert:
        context = ssl.create_default_context() if config.system_ca_required else \
            ssl.create_default_context(cafile=config.ca_cert)
        if config.system_ca_required:
            context.load_verify_locations(cafile=config.ca_cert)
    else:
        context = ssl.create_default_context()
    if config.client_cert:
        context.load_cert_chain(config.client_cert, config.client_key, password=config.client_key_passphrase or None)
    return context


class ServiceClient:
    def __init__(self, config: ServiceConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.name = config.name
        self._client = httpx.AsyncClient(
            base_url=config.url + "/", verify=ssl_context(config), transport=transport,
            headers={"user-agent": USER_AGENT, **dict(config.headers)},
            timeout=httpx.Timeout(config.response_header_timeout), follow_redirects=True)

    def _auth_headers(self) -> dict[str, str]:
        token = self.config.bearer_token
        if self.config.bearer_token_path:
            try:
                token = Path(self.config.bearer_token_path).read_text().strip()
            except OSError as exc:
                raise ServiceError(f"service {self.name}: cannot read the bearer token: {exc.strerror}") from None
        return {"authorization": f"{self.config.bearer_scheme} {token}"} if token else {}

    async def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                      content: bytes | None = None, timeout: float | None = None,
                      max_bytes: int | None = None) -> Reply:
        """Send one request and read its body (at most ``max_bytes``, decoded). Raises
        ``ServiceError`` for transport failures only: the caller judges the status."""
        url = path.strip("/")
        request_timeout = httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT
        try:
            request = self._client.build_request(method, url, headers={**self._auth_headers(), **(headers or {})},
                                                 content=content, timeout=request_timeout)
            response = await self._client.send(request, stream=True)
            try:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if max_bytes is not None and len(body) > max_bytes:
                        raise ServiceError(f"service {self.name}: response to {method} /{url} is larger than "
                                           f"{max_bytes} bytes", code="bundle_download_failed")
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise ServiceError(f"service {self.name}: {method} /{url} failed: {type(exc).__name__}: {exc}") from None
        return Reply(response.status_code, response.headers, bytes(body))

    async def close(self) -> None:
        await self._client.aclose()
