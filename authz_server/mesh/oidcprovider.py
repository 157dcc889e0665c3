"""Start and stop the real OpenID provider (``oidc-provider`` on Node.js) used by the end-to-end
tests and ``authz-server demo --idp oidc-provider``.

The provider lives in ``oidc-provider/`` at the top of the repository: ``provider.mjs`` plus a
``package.json`` and ``package-lock.json`` that ``make install`` installs with ``npm ci`` when
Node.js is present. This module writes the provider's config (keys, clients, accounts,
resource servers), starts ``node provider.mjs`` under a ``Supervisor`` and waits until it
answers its discovery document. Key rotation writes a new signing key first in the set
(the old one stays published, as OpenID Connect Core §10.1.1 asks) and restarts the provider
on the same port.
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..identity.jose import public_jwk
from .processes import Child, Supervisor, free_port, wait_until

PROVIDER_DIR = Path(__file__).resolve().parents[2] / "oidc-provider"


def unavailable_reason() -> str | None:
    """Why the provider cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "Node.js (node) is not installed"
    if not (PROVIDER_DIR / "provider.mjs").is_file():
        return f"{PROVIDER_DIR}/provider.mjs is missing (not a source checkout)"
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        return f"oidc-provider is not installed: run `make install` (npm ci in {PROVIDER_DIR})"
    return None


def signing_key(alg: str) -> dict[str, Any]:
    """A new private JWK for the provider (``kid``: the RFC 7638 thumbprint of its public half)."""
    if alg == "ES256":
        key: Any = ec.generate_private_key(ec.SECP256R1())
        exported = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    elif alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        exported = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise ValueError(f"the provider signs with ES256 or RS256, not {alg!r}")
    public = public_jwk(key.public_key(), alg=alg)
    exported.pop("key_ops", None)  # pyjwt marks private exports "sign"; the published half verifies
    return {**exported, "kid": public["kid"], "alg": alg, "use": "sig"}


@dataclass
class OidcProvider:
    """One provider process. ``clients`` are oidc-provider client metadata; ``accounts`` map a
    login to ``{"password", "claims"}``; ``resources`` map a resource indicator to
    ``{"audience", "scope", "format": "jwt"|"opaque"}``."""

    supervisor: Supervisor
    workdir: Path
    clients: list[Mapping[str, Any]]
    accounts: Mapping[str, Mapping[str, Any]]
    resources: Mapping[str, Mapping[str, Any]]
    default_resource: str | None = None
    port: int = 0
    host: str = "127.0.0.1"
    access_token_ttl: int = 600
    name: str = "oidc-provider"
    keys: list[dict[str, Any]] = field(default_factory=list)
    child: Child | None = None

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        """Start (or restart) the provider; returns its issuer URL once discovery answers."""
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        if not self.port:
            self.port = free_port(self.host)
        if not self.keys:
            self.keys = [signing_key("ES256"), signing_key("RS256")]
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / f"{self.name}.json"
        config_path.write_text(json.dumps({
            "issuer": self.issuer, "port": self.port, "host": self.host, "keys": self.keys,
            "clients": self.clients, "accounts": self.accounts, "resources": self.resources,
            "defaultResource": self.default_resource, "accessTokenTTL": self.access_token_ttl,
            "cookieSecret": secrets.token_urlsafe(32),
        }))
        config_path.chmod(0o600)
        self.child = self.supervisor.start(self.name, ["node", str(PROVIDER_DIR / "provider.mjs"), str(config_path)],
                                           cwd=PROVIDER_DIR, env={"NODE_ENV": "development"})
        wait_until(self._answers, timeout=timeout, what=f"{self.name} discovery", alive=self.child.ensure_running)
        return self.issuer

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.supervisor.children.remove(self.child)
            self.child = None

    def rotate_keys(self, alg: str = "ES256") -> str:
        """Sign with a new key from now on (restart on the same port); returns its kid."""
        new = signing_key(alg)
        self.keys = [new, *self.keys]
        self.stop()
        self.start()
        return str(new["kid"])

    def metadata(self) -> dict[str, Any]:
        return httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=5.0).json()
