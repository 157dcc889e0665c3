"""The evaluated world's identities: trust domains with their CAs and SVIDs, the dev OIDC
provider and its users, the tokens an attacker can make, and authz-server's settings for it.

The CAs and SVIDs come from the project's dev SPIFFE issuer (``authz_server.workload``), the
tokens from its dev OIDC provider (``authz_server.devidp``): the same code the demo mesh runs.
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..devidp.config import DevIdPConfig
from ..devidp.keys import sign_jwt
from ..devidp.provider import DevIdP
from ..identity.encoding import b64url_encode, json_compact
from ..identity.jose import public_jwk, sign
from ..workload.ca import Authority, create_authority
from ..workload.svid import X509Svid, issue_x509_svid
from .model import (AUDIENCE, DELEGATION_ACTORS, EXCHANGE_ISSUER, EXCHANGE_RULES, PARTNER_DOMAIN, THREAT_NETWORK,
                    THREAT_SUBJECTS, THREAT_WORKLOADS, TRUST_DOMAIN, TRUSTED_DOMAINS, UNTRUSTED_DOMAIN)

EVALUATION_USERS = ("alice", "bob", "carol", "dave", "erin", "grace", "heidi", "ivan", "mallory", "trudy",
                    "rita", "sam", "tina", "uma", "victor", "wendy", "xena", "yuri", "zoe", "flo", "pat")
CLIENT_ID = "web"
SVID_TTL = 24 * 3600.0


class Clock:
    """Settable time for the in-process world (the pipeline takes ``now``; so do its parts here)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Pki:
    """A CA per trust domain (example.org, partner.org, evil.org) and an SVID per workload."""

    now: float
    authorities: dict[str, Authority] = field(default_factory=dict)
    svids: dict[str, X509Svid] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for domain in (TRUST_DOMAIN, PARTNER_DOMAIN, UNTRUSTED_DOMAIN):
            self.authorities[domain] = create_authority(domain, ttl=2 * SVID_TTL, jwt_algorithm="ES256", now=self.now)

    def svid(self, spiffe_id: str) -> X509Svid:
        found = self.svids.get(spiffe_id)
        if found is None:
            domain = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
            ca = self.authorities[domain]
            found = self.svids[spiffe_id] = issue_x509_svid(spiffe_id, ca_certificate=ca.certificate,
                                                            ca_key=ca.private_key, authority_id=ca.id,
                                                            ttl=SVID_TTL, now=self.now)
        return found

    def certificate_pem(self, spiffe_id: str) -> str:
        return self.svid(spiffe_id).chain_pem().decode()

    def escaped_certificate(self, spiffe_id: str) -> str:
        """As Envoy forwards a peer certificate (``include_peer_certificate``): URL-encoded PEM."""
        return urllib.parse.quote(self.certificate_pem(spiffe_id), safe="")

    def thumbprint(self, spiffe_id: str) -> str:
        """RFC 8705 ``x5t#S256`` of the workload's certificate."""
        der = self.svid(spiffe_id).certificate.public_bytes(serialization.Encoding.DER)
        return b64url_encode(hashlib.sha256(der).digest())

    def ca_pem(self, *domains: str) -> bytes:
        return b"".join(self.authorities[d].certificate.public_bytes(serialization.Encoding.PEM) for d in domains)

    def write(self, folder: Path, spiffe_id: str) -> tuple[Path, Path]:
        """The SVID chain and key as PEM files (0600 key), for a TLS client or server."""
        folder.mkdir(parents=True, exist_ok=True)
        name = spiffe_id.removeprefix("spiffe://").replace("/", "_")
        chain, key = folder / f"{name}.pem", folder / f"{name}.key"
        svid = self.svid(spiffe_id)
        chain.write_bytes(svid.chain_pem())
        key.write_bytes(svid.key_pem())
        key.chmod(0o600)
        return chain, key


def idp_config(issuer: str | None = None) -> DevIdPConfig:
    users = [{"username": u, "password": f"{u}-password", "subject": u, "claims": {"roles": ["customer"]}}
             for u in EVALUATION_USERS]
    clients = [{"client_id": CLIENT_ID, "client_secret": "web-secret", "grants": ["password", "client_credentials"],
                "audiences": [AUDIENCE], "scopes": ["orders:read", "orders:write", "payments:write"]}]
    data: dict[str, Any] = {"users": users, "clients": clients, "token_ttl": "1h", "algorithms": ["RS256", "ES256"]}
    if issuer:
        data["issuer"] = issuer
    return DevIdPConfig.from_mapping(data)


class TokenForge:
    """Tokens as users get them, and as attackers make them."""

    def __init__(self, idp: DevIdP, clock: Callable[[], float]) -> None:
        self.idp = idp
        self.clock = clock
        self._attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def valid(self, user: str) -> str:
        return self.idp.issue(CLIENT_ID, username=user).access_token

    def _claims(self, user: str, now: float, **changes: Any) -> dict[str, Any]:
        claims: dict[str, Any] = {"iss": self.idp.issuer, "sub": user, "aud": AUDIENCE, "iat": int(now),
                                  "exp": int(now) + 600, "jti": secrets.token_urlsafe(16), "client_id": CLIENT_ID,
                                  "scope": "orders:read", "roles": ["customer"]}
        claims.update(changes)
        return claims

    def craft(self, defect: str, user: str) -> str:
        """A token with ``defect``: expired, forged, alg_none, alg_confusion, wrong_audience, untrusted_issuer."""
        now = self.clock()
        key = self.idp.keys.signing_key("RS256", now)
        if defect == "expired":
            return sign_jwt({"typ": "at+jwt"}, self._claims(user, now, iat=int(now) - 7200, exp=int(now) - 3600), key)
        if defect == "wrong_audience":
            return sign_jwt({"typ": "at+jwt"}, self._claims(user, now, aud="billing-api"), key)
        if defect == "forged":
            # The issuer's kid, the attacker's key: only the signature gives it away.
            return _compact({"alg": "RS256", "typ": "at+jwt", "kid": key.kid}, self._claims(user, now), "RS256",
                            self._attacker)
        if defect == "alg_none":
            return _compact({"alg": "none", "typ": "at+jwt", "kid": key.kid}, self._claims(user, now), None, None)
        if defect == "alg_confusion":
            # HS256 "signed" with the issuer's RSA public key: a verifier that picks the algorithm
            # from the token would check it against that very key, and accept it.
            public_pem = key.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
            return _compact({"alg": "HS256", "typ": "at+jwt", "kid": key.kid}, self._claims(user, now), "HS256",
                            public_pem)
        if defect == "untrusted_issuer":
            jwk = public_jwk(self._attacker.public_key(), alg="RS256")
            return _compact({"alg": "RS256", "typ": "at+jwt", "kid": jwk["kid"]},
                            self._claims(user, now, iss="https://idp.attacker.example"), "RS256", self._attacker)
        raise ValueError(f"unknown token defect {defect!r}")


def _compact(header: dict[str, Any], claims: dict[str, Any], alg: str | None, key: Any) -> str:
    signing_input = f"{b64url_encode(json_compact(header))}.{b64url_encode(json_compact(claims))}"
    signature = sign(alg, key, signing_input.encode()) if alg is not None else b""
    return f"{signing_input}.{b64url_encode(signature)}"


@dataclass(frozen=True)
class Limits:
    """The signals' knobs of one evaluated world."""

    rate: float = 20.0  # requests per second per identity
    burst: float = 40.0
    failure_rate: float = 2.0  # failed sign-ins per second per source
    failure_burst: float = 20.0


def threat_list_text() -> str:
    lines = ["# the evaluation's threat-intelligence list"]
    lines += [f"sub:{s}  known fraudster" for s in THREAT_SUBJECTS]
    lines += [f"{w}  compromised workload" for w in THREAT_WORKLOADS]
    lines += [f"{THREAT_NETWORK}  botnet range"]
    return "\n".join(lines) + "\n"


def authz_settings(*, policies: Path, folder: Path, issuer: str, jwks_file: Path | None = None,
                   limits: Limits | None = Limits(), audit: bool = True, sessions: bool = True,
                   exchange_ttl: str = "1h", anomaly: bool = False) -> dict[str, Any]:
    """authz-server's config for the evaluated world, as the YAML mapping ``serve --config`` reads.

    The zero-trust set-up of the demo mesh (``mesh/launcher.py``) plus the signals the default
    policy uses: a rate limit per identity, a budget of failed sign-ins per source, a threat list.
    The anomaly detector is off unless asked for: it learns from the traffic it sees, so what it
    says depends on the order of the whole run, which no plain statement of intent can follow."""
    folder.mkdir(parents=True, exist_ok=True)
    issuer_entry: dict[str, Any] = {"issuer": issuer, "audiences": [AUDIENCE], "algorithms": ["RS256", "ES256"]}
    if jwks_file is not None:
        issuer_entry["jwks_file"] = str(jwks_file)
    config: dict[str, Any] = {
        "addr": "127.0.0.1:0",
        "metrics_addr": "",
        "workers": 1,
        "log_level": "warning",
        "policies": str(policies),
        "trust_domains": list(TRUSTED_DOMAINS),
        "issuers": [issuer_entry],
        "sessions": {"enabled": sessions, "store": "memory", "idle_timeout": "15m", "max_lifetime": "8h",
                     "delegation": {"actors": list(DELEGATION_ACTORS)}},
        "exchange": {"addr": "127.0.0.1:0", "issuer": EXCHANGE_ISSUER, "ttl": exchange_ttl,
                     "trust_forwarded_client_cert": True,
                     "rules": [{"actor": a, "audiences": list(aud), "scopes": list(sc)}
                               for a, aud, sc in EXCHANGE_RULES]},
    }
    if limits is not None:
        threat_file = folder / "threats.txt"
        threat_file.write_text(threat_list_text())
        config["signals"] = {
            "rate": {"per_identity": {"rate": limits.rate, "burst": limits.burst}},
            "auth_failures": {"rate": limits.failure_rate, "burst": limits.failure_burst},
            "anomaly": {} if anomaly else False,
            "threat_lists": [{"name": "evaluation", "path": str(threat_file)}],
        }
    if audit:
        config["audit"] = [f"file:{folder / 'audit.jsonl'}"]
    return config
