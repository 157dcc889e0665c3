"""The evaluation's oracle on hand-picked cases: each states one sentence of the documented
intent (authz.rego's comments, the README, docs/signals.md) and what it means for a request."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_server.evaluate.model import AUDITOR, FRONTEND, INTRUDER, ORDERS, PAYMENTS, SCANNER
from authz_server.evaluate.oracle import (GUESSED, Ask, Bucket, Oracle, OracleSettings, Route, TokenFacts,
                                          load_route_table)

REPO = Path(__file__).resolve().parents[2]

# The shipped route table, restated (the last test checks the oracle reads data.yaml the same way).
ROUTES = {
    "frontend": (Route("/account", frozenset({"GET", "POST"}), "medium", users=True),
                 Route("/", frozenset({"GET", "POST"}), "low", users=True)),
    "orders": (Route("/orders", frozenset({"GET", "POST"}), "medium", users=True,
                     callers=frozenset({FRONTEND}), delegates=frozenset({FRONTEND})),),
    "payments": (Route("/payments", frozenset({"GET", "POST"}), "high", users=True,
                       callers=frozenset({ORDERS}), delegates=frozenset({ORDERS})),),
}
BROWSER = "10.0.1.10"


class World:
    """An oracle plus a clock and helpers to say who presents what."""

    def __init__(self, **settings: object) -> None:
        self.oracle = Oracle(ROUTES, OracleSettings(**settings))  # type: ignore[arg-type]
        self.now = 0.0
        self.count = 0

    def token(self, subject: str, **facts: str) -> str:
        self.count += 1
        label = f"t{self.count}"
        self.oracle.know_token(label, TokenFacts(subject, **facts))
        return label

    def ask(self, service: str, method: str, path: str, *, workload: str | None = None, source: str = BROWSER,
            session: str | None = None, token: str | None = None, capture: str | None = None,
            agent: str = "browser/1") -> tuple[bool, int]:
        self.now += 1.0
        expected = self.oracle.decide(Ask(service, method, path, workload, source, agent, self.now, session, token),
                                      capture=capture)
        return expected.allowed, expected.status

    def browser_session(self, user: str, label: str) -> str:
        assert self.ask("frontend", "GET", "/", token=self.token(user), capture=label) == (True, 200)
        return label


def test_nobody_is_refused_even_on_a_low_route() -> None:
    world = World()
    assert world.ask("frontend", "GET", "/") == (False, 403)
    assert world.ask("frontend", "GET", "/", workload=FRONTEND) == (False, 403)  # low: a user, not a workload


def test_a_token_once_then_the_session_it_became() -> None:
    world = World()
    world.browser_session("alice", "s")
    assert world.ask("frontend", "GET", "/account", session="s") == (True, 200)
    assert world.ask("frontend", "POST", "/account/address", session="s") == (True, 200)
    assert world.ask("frontend", "DELETE", "/account", session="s") == (False, 403)  # no route allows DELETE
    assert world.ask("billing", "GET", "/", session="s") == (False, 403)  # no such service


def test_a_denied_sign_in_hands_out_no_session() -> None:
    world = World()
    assert world.ask("payments", "GET", "/payments", token=world.token("alice"), capture="s") == (False, 403)
    assert not world.oracle.holds("s")
    assert world.ask("frontend", "GET", "/", session="s") == (False, 401)


def test_the_most_specific_route_governs_with_envoys_string_prefix() -> None:
    world = World()
    world.browser_session("alice", "s")
    assert world.ask("frontend", "GET", "/accounting", session="s") == (True, 200)  # /account covers /accounting
    assert world.ask("orders", "GET", "/orders-archive", workload=FRONTEND) == (True, 200)
    assert world.ask("orders", "GET", "/admin", workload=FRONTEND) == (False, 403)  # no route covers it


def test_medium_admits_a_listed_caller_alone_but_not_an_unlisted_one() -> None:
    world = World()
    assert world.ask("orders", "GET", "/orders/42", workload=FRONTEND) == (True, 200)
    assert world.ask("orders", "GET", "/orders", workload=PAYMENTS) == (False, 403)
    assert world.ask("orders", "GET", "/orders", workload=AUDITOR) == (False, 403)  # federated, listed nowhere


def test_delegation_by_a_listed_delegate_and_no_further() -> None:
    world = World()
    world.browser_session("alice", "s")
    assert world.ask("orders", "POST", "/orders", workload=FRONTEND, session="s") == (True, 200)
    assert world.ask("frontend", "GET", "/", workload=FRONTEND, session="s") == (False, 403)  # no delegates there
    assert world.ask("payments", "POST", "/payments", workload=FRONTEND, session="s") == (False, 403)


def test_a_session_presented_by_a_workload_that_may_not_act_for_users_is_stolen() -> None:
    world = World()
    world.browser_session("alice", "s")
    assert world.ask("orders", "GET", "/orders", workload=ORDERS, session="s") == (False, 401)
    assert world.ask("payments", "POST", "/payments", workload=PAYMENTS, session="s") == (False, 401)


def test_a_session_bound_to_a_workload_is_stolen_in_a_plain_clients_hands() -> None:
    world = World()
    assert world.ask("orders", "GET", "/orders", workload=FRONTEND, token=world.token("bob"), capture="f") == (True, 200)
    assert world.ask("orders", "GET", "/orders", workload=FRONTEND, session="f") == (True, 200)  # the user's own call
    assert world.ask("frontend", "GET", "/", session="f") == (False, 401)


def test_high_wants_the_listed_caller_with_a_credential_bound_to_itself() -> None:
    world = World()
    exchanged = world.token("alice", kind="exchanged", actor=ORDERS, audience="payments")
    assert world.ask("payments", "POST", "/payments", workload=ORDERS, token=exchanged, capture="o") == (True, 200)
    assert world.ask("payments", "POST", "/payments", workload=ORDERS, session="o") == (True, 200)
    # no bare user token, no workload alone, no one else's session, not someone else acting through it
    assert world.ask("payments", "POST", "/payments", workload=ORDERS, token=world.token("alice")) == (False, 403)
    assert world.ask("payments", "POST", "/payments", workload=ORDERS) == (False, 403)
    assert world.ask("payments", "POST", "/payments", workload=FRONTEND, session="o") == (False, 403)
    assert world.ask("payments", "POST", "/payments", workload=PAYMENTS, session="o") == (False, 401)


def test_a_session_orders_owns_works_at_high_whatever_token_made_it() -> None:
    world = World()
    assert world.ask("orders", "GET", "/orders", workload=ORDERS, token=world.token("carol"), capture="o") == (True, 200)
    assert world.ask("payments", "GET", "/payments", workload=ORDERS, session="o") == (True, 200)


def test_an_exchanged_token_is_for_its_actor_and_its_service_only() -> None:
    world = World()
    exchanged = world.token("alice", kind="exchanged", actor=ORDERS, audience="payments")
    assert world.ask("payments", "POST", "/payments", workload=FRONTEND, token=exchanged) == (False, 401)
    assert world.ask("orders", "POST", "/orders", workload=ORDERS, token=exchanged) == (False, 403)  # orders acting
    assert world.ask("frontend", "GET", "/account", workload=ORDERS, token=exchanged) == (False, 403)


def test_a_token_used_first_by_one_client_is_a_replay_from_any_other() -> None:
    world = World()
    token = world.token("alice")
    assert world.ask("frontend", "GET", "/", token=token) == (True, 200)
    assert world.ask("frontend", "GET", "/account", token=token) == (True, 200)  # the same client again
    assert world.ask("orders", "GET", "/orders", workload=ORDERS, token=token) == (False, 401)
    assert world.ask("frontend", "GET", "/", token=token, source="10.0.4.4") == (False, 401)  # another address


@pytest.mark.parametrize("defect", ["expired", "forged", "alg_none", "alg_confusion", "wrong_audience",
                                    "untrusted_issuer"])
def test_a_broken_token_is_no_identity(defect: str) -> None:
    world = World()
    assert world.ask("frontend", "GET", "/", token=world.token("alice", defect=defect)) == (False, 401)


def test_unknown_revoked_and_untrusted_are_refused_before_the_route() -> None:
    world = World()
    world.browser_session("alice", "s")
    assert world.ask("frontend", "GET", "/", session=GUESSED) == (False, 401)
    assert world.ask("orders", "GET", "/orders", workload=INTRUDER) == (False, 401)
    assert world.ask("orders", "GET", "/orders", workload=INTRUDER, session="s") == (False, 401)
    world.oracle.revoke("s")
    assert world.ask("frontend", "GET", "/", session="s") == (False, 401)


def test_threat_lists_refuse_listed_users_workloads_and_addresses() -> None:
    world = World()
    assert world.ask("frontend", "GET", "/", token=world.token("mallory")) == (False, 403)
    assert world.ask("orders", "GET", "/orders", workload=SCANNER) == (False, 403)
    assert world.ask("frontend", "GET", "/", token=world.token("trudy"), source="10.66.6.7") == (False, 403)


def test_a_delegation_chain_longer_than_allowed_is_refused() -> None:
    world = World(max_hops=1)
    exchanged = world.token("alice", kind="exchanged", actor=ORDERS, audience="payments")
    assert world.ask("payments", "POST", "/payments", workload=ORDERS, token=exchanged, capture="o") == (True, 200)
    assert world.ask("orders", "GET", "/orders", workload=FRONTEND, session="o") == (False, 401)


def test_each_identity_has_a_token_bucket() -> None:
    world = World(rate=Bucket(rate=1.0, burst=3.0))
    world.browser_session("alice", "s")  # takes one token at t=1
    oracle = world.oracle

    def at(t: float, **kwargs: str) -> bool:
        return oracle.decide(Ask("frontend", "GET", "/", None, BROWSER, "browser/1", t, **kwargs)).allowed

    assert [at(1.0, session="s"), at(1.0, session="s"), at(1.0, session="s")] == [True, True, False]
    assert at(2.0, session="s") and not at(2.0, session="s")  # one token back a second later
    assert oracle.decide(Ask("frontend", "GET", "/", None, BROWSER, "b", 2.0, "s")).status == 429


def test_a_source_past_its_failed_sign_in_budget_is_locked_out() -> None:
    world = World(failures=Bucket(rate=0.5, burst=2.0))
    oracle = world.oracle
    good = world.token("alice")

    def at(t: float, **kwargs: str | None) -> tuple[bool, int]:
        expected = oracle.decide(Ask("frontend", "GET", "/", None, "10.0.7.7", "stuffer", t, **kwargs))
        return expected.allowed, expected.status

    assert [at(1.0, session=GUESSED) for _ in range(3)] == [(False, 401)] * 3  # the third spends past the budget
    assert at(1.5, token=good) == (False, 429)  # refused unchecked, even with a good token
    assert at(3.5, token=good) == (True, 200)  # a token is back after 1/rate seconds


def test_the_oracle_reads_the_shipped_route_table() -> None:
    assert load_route_table(REPO / "policies") == ROUTES
