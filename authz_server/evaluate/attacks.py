"""The attack suite: small scripted scenarios, each with the outcome it expects, run against a
``Target`` with zero trust on and off.

Per attack: **attempts** (the requests that are the attack proper; set-up such as the victim
signing in is not counted), **blocked** (attempts that did not get what they were after: the
service never answered them, or for path tricks never served the forbidden resource) and
**detected** (blocked attempts the evidence names as that attack: the audit record of the
decision carries one of the attack's codes, read back from the ``file:`` sink; a handshake
Envoy refused never reaches authz-server, so there it is Envoy's ``ssl.fail_verify_*``
counters that say so).

Two attacks are about volume rather than single requests: for **rate abuse** the attempts are
the requests past the limit (burst plus refill over the flood's duration), for **credential
stuffing** the guesses past the failed-sign-in budget; requests within the allowance are
reported in the notes.
"""

from __future__ import annotations

import asyncio
import math
import posixpath
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from .model import AUDITOR, FRONTEND, INTRUDER, ORDERS, PAYMENTS, Outcome, Request
from .targets import Target
from .traffic import guessed_session_id
from .world import Limits

POLICY_DENIED = frozenset({"policy_denied"})


@dataclass(slots=True)
class Attempt:
    request: Request
    outcome: Outcome
    forbidden: str = ""  # path tricks: the resource the attempt must not reach


@dataclass
class Scene:
    """One attack's stage: its target, its own client addresses, what it sent."""

    target: Target
    limits: Limits
    block: int
    attempts: list[Attempt] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def source(self, n: int = 1) -> str:
        return f"10.{20 + self.block}.0.{n}"

    async def attempt(self, request: Request, *, forbidden: str = "") -> Outcome:
        outcome = await self.target.send(request)
        self.attempts.append(Attempt(request, outcome, forbidden))
        return outcome

    async def browser_session(self, user: str, source: str) -> str:
        """The user signs in from a browser: the token once, a session id back."""
        token = self.target.user_token(user)
        outcome = await self.target.send(Request("frontend", "GET", "/", None, (("authorization", f"Bearer {token}"),),
                                                 source=source, user_agent=f"browser/{user}"))
        return outcome.session_id or guessed_session_id()

    async def workload_session(self, user: str, workload: str) -> str:
        """A workload presents the user's token on a route open to users: a session bound to it."""
        token = self.target.user_token(user)
        outcome = await self.target.send(Request("orders", "GET", "/orders", workload,
                                                 (("authorization", f"Bearer {token}"),)))
        return outcome.session_id or guessed_session_id()

    async def exchanged(self, user: str) -> tuple[str, str]:
        """orders trades the user's token for one for payments, and pays with it: (token, session)."""
        token = await self.target.exchange(ORDERS, self.target.user_token(user), "payments")
        outcome = await self.target.send(Request("payments", "POST", "/payments", ORDERS,
                                                 (("authorization", f"Bearer {token}"),)))
        return token, outcome.session_id or guessed_session_id()


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _session(session: str) -> tuple[tuple[str, str]]:
    return (("x-session-id", session),)


# -- the scenarios ------------------------------------------------------------------------------

async def token_replay(s: Scene) -> None:
    token = s.target.user_token("rita")
    owner = s.source(1)
    await s.target.send(Request("frontend", "GET", "/", None, _bearer(token), source=owner, user_agent="browser/rita"))
    await s.attempt(Request("orders", "GET", "/orders", ORDERS, _bearer(token)))
    await s.attempt(Request("payments", "POST", "/payments", PAYMENTS, _bearer(token)))
    await s.attempt(Request("frontend", "GET", "/account", None, _bearer(token), source=s.source(2),
                            user_agent="thief/1"))
    s.notes.append("rita's token was first used from her browser; the same token is then presented by orders, by "
                   "payments and by another client address")


async def stolen_session(s: Scene) -> None:
    session = await s.browser_session("sam", s.source(1))
    _token, bound_to_orders = await s.exchanged("sam")
    await s.attempt(Request("orders", "GET", "/orders", ORDERS, _session(session)))
    await s.attempt(Request("payments", "POST", "/payments", PAYMENTS, _session(session)))
    await s.attempt(Request("orders", "GET", "/orders", AUDITOR, _session(session)))
    await s.attempt(Request("payments", "POST", "/payments", PAYMENTS, _session(bound_to_orders)))
    s.notes.append("sam's browser session, and the session orders holds for sam, presented by workloads they are not "
                   "bound to and that may not act for users (frontend is the only delegation actor)")


def _token_attack(defect: str, user: str, *, tamper: bool = False) -> Callable[[Scene], Awaitable[None]]:
    async def scenario(s: Scene) -> None:
        source, agent = s.source(1), f"browser/{user}"
        token = s.target.forged_token(defect, user)
        await s.attempt(Request("frontend", "GET", "/account", None, _bearer(token), source=source, user_agent=agent))
        await s.attempt(Request("orders", "POST", "/orders", FRONTEND, _bearer(s.target.forged_token(defect, user))))
        if tamper:
            tampered = _flip_signature(s.target.user_token(user))
            await s.attempt(Request("frontend", "GET", "/", None, _bearer(tampered), source=source, user_agent=agent))
    return scenario


def _flip_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    last = "A" if signature[-2] != "A" else "B"
    return f"{head}.{payload}.{signature[:-2]}{last}{signature[-1]}"


async def wrong_role(s: Scene) -> None:
    await s.attempt(Request("frontend", "GET", "/account", FRONTEND))  # a workload alone on a users-only route
    await s.attempt(Request("orders", "POST", "/orders", PAYMENTS))  # orders lists frontend as its only caller
    await s.attempt(Request("orders", "GET", "/orders", AUDITOR))  # a federated partner with no role here
    s.notes.append("valid identities of the wrong kind for the route: frontend's SVID alone on /account (users "
                   "only), payments' SVID on orders (callers: frontend), partner.org's auditor on orders")


async def wrong_service(s: Scene) -> None:
    token, session = await s.exchanged("yuri")
    await s.attempt(Request("orders", "POST", "/orders", ORDERS, _bearer(token)))
    await s.attempt(Request("frontend", "GET", "/account", ORDERS, _bearer(token)))
    await s.attempt(Request("orders", "GET", "/orders", ORDERS, _session(session)))
    s.notes.append("the token orders obtained for payments (RFC 8693, audience payments), and the session it "
                   "became, used by orders at orders and at frontend")


async def lateral_movement(s: Scene) -> None:
    session = await s.browser_session("zoe", s.source(1))
    own = await s.workload_session("zoe", FRONTEND)
    await s.attempt(Request("payments", "GET", "/payments", FRONTEND))
    await s.attempt(Request("payments", "POST", "/payments", FRONTEND, _session(session)))
    await s.attempt(Request("payments", "POST", "/payments", FRONTEND, _session(own)))
    await s.attempt(Request("payments", "POST", "/payments", FRONTEND, _bearer(s.target.user_token("zoe"))))
    s.notes.append("a compromised frontend goes straight to payments: alone, with zoe's session (delegation), with "
                   "its own session for zoe, with a fresh token of zoe's")


# Each trick dresses the forbidden /admin of orders as a path under /orders (which the attacker
# may call), or hides the real target from a naive prefix check.
PATH_TRICKS: tuple[tuple[str, str], ...] = (
    ("dot-dot", "/orders/../admin"),
    ("percent-encoded dots", "/orders/%2e%2e/admin"),
    ("percent-encoded dots, upper case", "/orders/%2E%2E/admin"),
    ("mixed dot and encoded dot", "/orders/.%2e/admin"),
    ("encoded slash", "/orders/..%2fadmin"),
    ("encoded slashes", "/orders%2f..%2fadmin"),
    ("double slash", "//admin"),
    ("double slash after dot-dot", "/orders/..//admin"),
    ("dot segment", "/orders/./../admin"),
    ("backslashes", "/orders\\..\\admin"),
    ("path parameter", "/orders;/../admin"),
    ("encoded unreserved character", "/%61dmin"),
    ("case", "/Admin"),
    ("case after dot-dot", "/orders/../ADMIN"),
    ("trailing slash", "/admin/"),
    ("trailing slash after dot-dot", "/orders/../admin/"),
    ("allowed prefix in the query", "/admin?/orders"),
    ("encoded question mark", "/admin%3f/orders"),
)


def canonical(path: str) -> str:
    """What a lenient service could take a path to mean: decoded once, query and path parameters
    dropped, backslashes as slashes, dot segments resolved, slashes merged, lower case, no
    trailing slash."""
    text = urllib.parse.unquote(path).replace("\\", "/")
    text = text.split("?", 1)[0].split("#", 1)[0]
    text = "/".join(part.split(";", 1)[0] for part in text.split("/"))
    text = posixpath.normpath("/" + text.lstrip("/")).lower()
    return text.rstrip("/") or "/"


async def path_tricks(s: Scene) -> None:
    session = await s.browser_session("pat", s.source(1))
    for _label, path in PATH_TRICKS:
        await s.attempt(Request("orders", "GET", path, FRONTEND, _session(session)), forbidden="/admin")
    s.notes.append("frontend may call orders' /orders for pat (delegation); each trick aims at orders' /admin, "
                   "which no route allows, through real Envoy (normalize_path, merge_slashes, escaped slashes "
                   "unescaped and redirected: redirects are followed)")


async def unfederated_domain(s: Scene) -> None:
    token = s.target.user_token("flo")
    await s.attempt(Request("orders", "GET", "/orders", INTRUDER))
    await s.attempt(Request("payments", "POST", "/payments", INTRUDER, _bearer(token)))
    await s.attempt(Request("orders", "GET", "/orders", INTRUDER, door="lenient"))
    await s.attempt(Request("orders", "POST", "/orders", INTRUDER, _bearer(s.target.user_token("flo")), door="lenient"))
    s.notes.append("a workload of evil.org (federated with no one) calling itself frontend: at the regular mTLS doors "
                   "(CA bundle of example.org and partner.org only), then at a door misconfigured to trust every CA")


async def rate_abuse(s: Scene) -> None:
    user, source = "uma", s.source(1)
    started = time.monotonic()
    session = await s.browser_session(user, source)
    flood = int(s.limits.burst * 2 + 20)
    request = Request("frontend", "GET", "/", None, _session(session), source=source, user_agent=f"browser/{user}")
    outcomes = await _concurrently([request] * flood, s.target, 16)
    elapsed = time.monotonic() - started
    allowance = max(0, math.floor(s.limits.burst + s.limits.rate * elapsed) - 1)  # the sign-in took one
    admitted = sum(1 for o in outcomes if o.reached)
    for outcome in outcomes:
        s.attempts.append(Attempt(request, outcome))
    s.extra.update(flood=flood, allowance=allowance, admitted=admitted, elapsed=elapsed)
    s.notes.append(f"{flood} requests in {elapsed:.2f}s from one signed-in user; the limit ({s.limits.burst:g} burst, "
                   f"{s.limits.rate:g}/s) allows {allowance} after the sign-in; {admitted} were let through")


async def credential_stuffing(s: Scene) -> None:
    source = s.source(1)
    started = time.monotonic()
    guesses = int(s.limits.failure_burst * 3 + 10)
    requests = []
    for i in range(guesses):
        headers = (_bearer(s.target.forged_token("forged", "victor")) if i % 4 == 3
                   else _session(guessed_session_id()))
        requests.append(Request("frontend", "GET", "/account", None, headers, source=source, user_agent="stuffer/1"))
    for request in requests:  # one after the other, as the budget is counted
        await s.attempt(request)
    elapsed = time.monotonic() - started
    allowance = math.floor(s.limits.failure_burst + s.limits.failure_rate * elapsed) + 1
    # Through: every guess that was looked at (refused 401) or let in; the rest were refused unchecked.
    through = sum(1 for a in s.attempts if a.outcome.reached or a.outcome.status == 401)
    s.extra.update(guesses=guesses, allowance=allowance, through=through)
    s.notes.append(f"{guesses} guessed session ids and forged tokens from one address; the budget of failed "
                   f"sign-ins ({s.limits.failure_burst:g}, refilling {s.limits.failure_rate:g}/s) allows "
                   f"{allowance} to be checked; {through} were checked or let in, "
                   f"{guesses - through} refused without a look")


async def _concurrently(requests: list[Request], target: Target, width: int) -> list[Outcome]:
    gate = asyncio.Semaphore(width)

    async def one(request: Request) -> Outcome:
        async with gate:
            return await target.send(request)

    return list(await asyncio.gather(*(one(r) for r in requests)))


@dataclass(frozen=True)
class Attack:
    name: str
    title: str
    expected: str  # the outcome the scenario expects with zero trust, in words
    codes: frozenset[str]  # audit codes that identify it
    scenario: Callable[[Scene], Awaitable[None]]
    needs_envoy: bool = False
    volume: str = ""  # "rate" | "stuffing": attempts counted past a threshold


ATTACKS: tuple[Attack, ...] = (
    Attack("token_replay", "Token replay from another client", "401 token_replay",
           frozenset({"token_replay"}), token_replay),
    Attack("stolen_session", "Stolen session id used from another workload", "401 session_bound_elsewhere",
           frozenset({"session_bound_elsewhere"}), stolen_session),
    Attack("expired_token", "Expired token", "401 expired_token", frozenset({"expired_token"}),
           _token_attack("expired", "tina")),
    Attack("forged_token", "Forged token (bad signature)", "401 bad_signature", frozenset({"bad_signature"}),
           _token_attack("forged", "victor", tamper=True)),
    Attack("alg_none", "alg:none token", "401 alg_not_allowed", frozenset({"alg_not_allowed"}),
           _token_attack("alg_none", "wendy")),
    Attack("alg_confusion", "Algorithm confusion (HS256 signed with the RSA public key)", "401 alg_not_allowed",
           frozenset({"alg_not_allowed"}), _token_attack("alg_confusion", "xena")),
    Attack("wrong_role", "Wrong role for the route", "403 policy_denied", POLICY_DENIED, wrong_role),
    Attack("wrong_service", "Credential for one service used at another", "403 policy_denied", POLICY_DENIED,
           wrong_service),
    Attack("lateral_movement", "Lateral movement: frontend's SVID straight to payments", "403 policy_denied",
           POLICY_DENIED, lateral_movement),
    Attack("path_tricks", "Policy bypass by path tricks", "403 policy_denied on the normalised path",
           POLICY_DENIED, path_tricks, needs_envoy=True),
    Attack("unfederated_domain", "Workload from an unfederated trust domain",
           "TLS handshake refused; past a lenient door, 401 untrusted_trust_domain",
           frozenset({"untrusted_trust_domain"}), unfederated_domain),
    Attack("rate_abuse", "Rate abuse (one identity floods)", "429 rate_limited past the limit",
           frozenset({"rate_limited"}), rate_abuse, volume="rate"),
    Attack("credential_stuffing", "Credential stuffing (guessed sessions, forged tokens)",
           "429 credential_stuffing past the failed sign-in budget", frozenset({"credential_stuffing"}),
           credential_stuffing, volume="stuffing"),
)


@dataclass
class AttackResult:
    name: str
    title: str
    expected: str
    codes: list[str]
    target: str
    zero_trust: bool
    applicable: bool = True
    attempts: int = 0
    blocked: int = 0
    detected: int = 0
    detected_by: str = ""
    notes: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    observed: list[dict[str, Any]] = field(default_factory=list)


def _blocked(attempt: Attempt) -> bool:
    outcome = attempt.outcome
    if attempt.forbidden:
        return not (outcome.reached and canonical(outcome.upstream_path) == attempt.forbidden)
    return not outcome.reached


async def run_attack(attack: Attack, target: Target, limits: Limits, block: int) -> AttackResult:
    result = AttackResult(attack.name, attack.title, attack.expected, sorted(attack.codes), target.name,
                          target.zero_trust)
    if attack.needs_envoy and not target.through_envoy:
        result.applicable = False
        result.notes.append("needs a real Envoy: the path the policy sees is the one Envoy normalised and routes on")
        return result
    scene = Scene(target, limits, block)
    tls_before = await target.tls_refusals()
    await attack.scenario(scene)
    tls_refused = await target.tls_refusals() - tls_before
    records = await target.audit_records(a.outcome.decision_id for a in scene.attempts) if target.zero_trust else {}
    result.notes += scene.notes
    attempts = scene.attempts
    if attack.volume:
        _volume(attack, scene, records, result)
    else:
        result.attempts = len(attempts)
        blocked = [a for a in attempts if _blocked(a)]
        result.blocked = len(blocked)
        by_audit = sum(1 for a in blocked if _identified(a, records, attack.codes))
        tls_attempts = sum(1 for a in blocked if a.outcome.tls_refused)
        by_tls = min(tls_attempts, tls_refused)
        result.detected = by_audit + by_tls
        result.detected_by = " + ".join(filter(None, ["audit log" if by_audit else "",
                                                      "Envoy TLS counters" if by_tls else ""]))
    shown = attempts[:2] + attempts[-4:] if attack.volume and len(attempts) > 6 else attempts[:24]
    result.examples = [_example(a, records) for a in shown]
    result.observed = [_observed(a, records) for a in attempts] if attack.name == "path_tricks" else []
    return result


def _observed(attempt: Attempt, records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per path trick: what was sent, what Envoy answered, what the service got, what the policy saw."""
    record = records.get(attempt.outcome.decision_id) or {}
    seen = (((record.get("input") or {}).get("attributes") or {}).get("request") or {}).get("http", {}).get("path")
    return {"sent": attempt.request.path, "status": attempt.outcome.status, "redirects": attempt.outcome.redirects,
            "service_received": attempt.outcome.upstream_path if attempt.outcome.reached else None,
            "policy_saw": seen, "code": record.get("reason")}


def _identified(attempt: Attempt, records: Mapping[str, Mapping[str, Any]], codes: frozenset[str]) -> bool:
    record = records.get(attempt.outcome.decision_id)
    return record is not None and record.get("reason") in codes and not record.get("allowed", False)


def _volume(attack: Attack, scene: Scene, records: Mapping[str, Mapping[str, Any]], result: AttackResult) -> None:
    attempts = scene.attempts
    allowance = int(scene.extra["allowance"])
    through = int(scene.extra["admitted" if attack.volume == "rate" else "through"])
    result.attempts = max(0, len(attempts) - allowance)
    leaked = max(0, through - allowance)
    result.blocked = result.attempts - leaked
    identified = sum(1 for a in attempts if _identified(a, records, attack.codes))
    result.detected = min(result.blocked, identified)
    result.detected_by = "audit log" if identified else ""


def _example(attempt: Attempt, records: Mapping[str, Mapping[str, Any]]) -> str:
    request, outcome = attempt.request, attempt.outcome
    if outcome.tls_refused:
        answer = "TLS handshake refused"
    else:
        answer = f"HTTP {outcome.status}"
        if outcome.code:
            answer += f" {outcome.code}"
        if outcome.reached:
            answer += f", the service received {outcome.upstream_path}"
        if outcome.redirects:
            answer += f" (after {outcome.redirects} redirect)"
    record = records.get(outcome.decision_id)
    if record is not None:
        seen = (((record.get("input") or {}).get("attributes") or {}).get("request") or {}).get("http", {}).get("path")
        answer += f"; audit: {record.get('reason')}" + (f" on {seen}" if seen and seen != request.path else "")
    who = request.workload or "a plain client"
    return f"{request.method} {request.service} {request.path!s} as {who}" + (
        " (lenient door)" if request.door else "") + f" → {answer}"


async def run_suite(target: Target, limits: Limits, *, progress: Callable[[str], None] = lambda _l: None,
                    only: tuple[str, ...] = ()) -> list[AttackResult]:
    results = []
    for block, attack in enumerate(ATTACKS):
        if only and attack.name not in only:
            continue
        result = await run_attack(attack, target, limits, block)
        results.append(result)
        if result.applicable:
            progress(f"attacks [{target.name}]: {attack.name}: {result.blocked}/{result.attempts} blocked, "
                     f"{result.detected} detected")
    return results
