"""The route-table world of the traffic benchmark: 50 routes, 1,000 users, and requests that
do not repeat (an id in every path, a query string, users drawn at random).

One model serves every consumer, so they cannot drift apart: the Rego policy and its data
(``write_policy``), Envoy's native RBAC with the same rules (``rbac_config``), the Python
requests with their expected answers (``requests``), and the tables the wrk script draws
from (``lua_tables``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICES = ("orders", "payments", "users", "catalog", "inventory", "shipping", "reviews", "search", "billing",
            "reports")
# (method, path pattern, who may) for each service: 10 x 5 = 50 routes
KINDS = (("GET", "/api/v1/{s}", "read"), ("GET", "/api/v1/{s}/*", "read"), ("POST", "/api/v1/{s}", "write"),
         ("PUT", "/api/v1/{s}/*", "write"), ("DELETE", "/api/v1/{s}/*", "admin"))
USERS = 1000

POLICY = """package envoy.authz

import rego.v1

default allow := false

# The caller: the signed-in user of a session, else the x-user header a trusted front set.
user := input.identity.user.sub

user := input.attributes.request.http.headers["x-user"] if not input.identity.user.sub

request_path := split(input.attributes.request.http.path, "?")[0]

allow if {
	some route in data.routes
	route.method == input.attributes.request.http.method
	glob.match(route.path, ["/"], request_path)
	some role in data.users[user].roles
	role in route.roles
}
"""


def roles_for(service: str, who: str) -> list[str]:
    return {"read": ["viewer", "editor", "admin", f"{service}:editor"],
            "write": ["editor", "admin", f"{service}:editor"],
            "admin": ["admin"]}[who]


def routes() -> list[dict[str, Any]]:
    return [{"method": method, "path": path.format(s=service), "roles": roles_for(service, who)}
            for service in SERVICES for method, path, who in KINDS]


def users(seed: int = 7) -> dict[str, list[str]]:
    rng = random.Random(seed)
    table: dict[str, list[str]] = {}
    for n in range(USERS):
        pick = rng.random()
        roles = (["viewer"] if pick < 0.5 else ["editor"] if pick < 0.75 else ["admin"] if pick < 0.8
                 else [f"{rng.choice(SERVICES)}:editor"])
        if rng.random() < 0.2:
            roles.append(f"{rng.choice(SERVICES)}:editor")
        table[f"user{n:04d}"] = roles
    return table


def write_policy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.rego").write_text(POLICY)
    (folder / "data.json").write_text(json.dumps({"routes": routes(),
                                                  "users": {u: {"roles": r} for u, r in users().items()}}))
    return folder


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with its query string
    user: str
    allowed: bool


def _allowed(method: str, service: str, item: bool, roles: list[str]) -> bool:
    for kind_method, pattern, who in KINDS:
        if kind_method == method and pattern.endswith("*") == item:
            return any(role in roles_for(service, who) for role in roles)
    return False  # PATCH: no route


def requests(count: int, seed: int) -> list[Request]:
    """``count`` requests as the wrk script makes them: 5 % unknown users, some methods no
    route allows, a fresh id and query string each time."""
    rng = random.Random(seed)
    table = users()
    out = []
    for _ in range(count):
        user = f"user{rng.randrange(USERS):04d}" if rng.random() > 0.05 else f"stranger{rng.randrange(10**6)}"
        service = rng.choice(SERVICES)
        method = rng.choice(("GET", "GET", "POST", "PUT", "DELETE", "PATCH"))
        item = method in ("PUT", "DELETE", "PATCH") or (method == "GET" and rng.random() < 0.7)
        path = f"/api/v1/{service}" + (f"/{rng.randrange(10**9)}" if item else "")
        path += f"?page={rng.randrange(100)}&trace={rng.randrange(10**9):x}"
        out.append(Request(method, path, user, _allowed(method, service, item, table.get(user, []))))
    return out


def rbac_config() -> dict[str, Any]:
    """Envoy's RBAC filter with the same rules: per role, the routes it opens (method and path,
    query ignored) for the users who hold it (``x-user``)."""
    holders: dict[str, list[str]] = {}
    for user, roles in users().items():
        for role in roles:
            holders.setdefault(role, []).append(user)
    policies: dict[str, Any] = {}
    for role, people in sorted(holders.items()):
        permissions = []
        for route in routes():
            if role not in route["roles"]:
                continue
            base = route["path"].removesuffix("/*")
            path = ({"safe_regex": {"regex": f"^{base}/[^/]+$"}} if route["path"].endswith("/*")
                    else {"exact": base})
            permissions.append({"and_rules": {"rules": [
                {"header": {"name": ":method", "string_match": {"exact": route["method"]}}},
                {"url_path": {"path": path}}]}})
        policies[role] = {"permissions": [{"or_rules": {"rules": permissions}}],
                          "principals": [{"or_ids": {"ids": [
                              {"header": {"name": "x-user", "string_match": {"exact": user}}} for user in people]}}]}
    return {"rules": {"action": "ALLOW", "policies": policies}}


def lua_tables() -> str:
    """The model's tables in Lua, for the wrk script (``traffic.lua``)."""
    table = users()
    names = ", ".join(f'"{u}"' for u in table)
    roles = ", ".join(f'["{u}"] = {{{", ".join(json.dumps(r) for r in rs)}}}' for u, rs in table.items())
    services = ", ".join(f'"{s}"' for s in SERVICES)
    return f"users = {{{names}}}\nroles = {{{roles}}}\nservices = {{{services}}}\n"
