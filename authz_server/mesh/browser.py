"""A scripted browser: an HTTP client that follows redirects, keeps cookies (Secure ones only over
https, as browsers do) and fills in the provider's sign-in form, counting every round trip.
The sign-in demo and the end-to-end tests drive browser sign-in with it."""

from __future__ import annotations

import html
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx

_FORM = re.compile(r'<form[^>]*method="post"[^>]*action="([^"]+)"', re.IGNORECASE)


@dataclass
class ScriptedBrowser:
    client: httpx.AsyncClient
    visits: list[tuple[str, str, int]] = field(default_factory=list)  # (method, url, status)

    @classmethod
    def open(cls, ca_file: str) -> "ScriptedBrowser":
        return cls(httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_file), follow_redirects=False, timeout=10,
                                     headers={"user-agent": "scripted-browser/1", "accept": "text/html"}))

    async def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        response = await self.client.request(method, url, **kwargs)  # type: ignore[arg-type]
        self.visits.append((method, url, response.status_code))
        return response

    async def go(self, url: str, *, max_hops: int = 20, stop_before: str | None = None) -> httpx.Response:
        """GET ``url`` and follow redirects as a browser does (303/302 become GET); with
        ``stop_before``, the redirect to a URL starting with it is returned, not followed."""
        response = await self.request("GET", url)
        for _ in range(max_hops):
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            url = urljoin(url, response.headers["location"])
            if stop_before is not None and url.startswith(stop_before):
                return response
            response = await self.request("GET", url)
        raise AssertionError(f"more than {max_hops} redirects")

    async def sign_in(self, page: httpx.Response, login: str, password: str, *,
                      stop_before: str | None = None) -> httpx.Response:
        """Fill in and send the provider's sign-in form on ``page``, then follow the redirects."""
        match = _FORM.search(page.text)
        assert match, f"no sign-in form on {page.url}: {page.text[:200]}"
        action = urljoin(str(page.url), html.unescape(match.group(1)))
        response = await self.request("POST", action, data={"login": login, "password": password})
        if response.status_code in (302, 303):
            return await self.go(urljoin(action, response.headers["location"]), stop_before=stop_before)
        return response

    def pre_auth_cookies(self) -> list[tuple[str, str]]:
        return [(c.name, c.value) for c in self.client.cookies.jar if c.name.startswith("__Host-authz-login-")]

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.client.cookies.jar if c.name == name), None)

    async def close(self) -> None:
        await self.client.aclose()
