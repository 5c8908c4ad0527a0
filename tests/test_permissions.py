"""The permission engine as pure functions: constraints, grants, overrides, the agent-for-user
intersection and rights. The API and the tool gateway are tested on top of it elsewhere
(tests/test_authz_matrix.py, tests/test_tool_gateway.py); these pin each rule's edges."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stead.policy.loader import PolicySet
from stead.policy.permissions import (
    Constraint,
    Grant,
    Grants,
    Override,
    PermissionPolicy,
    Verdict,
    combine,
    evaluate,
    parse_policy,
)

ROOT = Path(__file__).resolve().parent.parent


def shipped() -> PermissionPolicy:
    """The reference application's permissions, merged over the platform's defaults as its
    worker loads them."""
    return PolicySet.load([ROOT / "policies"]).permissions


FACTS = {"customer_id": "cus_1", "customer_email": "Jane@Initech.test"}


def constraint(**bounds: Any) -> Constraint:
    return Constraint.model_validate({"field": "x", **bounds})


@pytest.mark.parametrize(
    ("bounds", "value", "problem"),
    [
        ({"max": 100}, 100, None),
        ({"max": 100}, "100.00", None),
        ({"max": 100}, "100.01", "x 100.01 exceeds the limit 100"),
        ({"min": 1}, 1, None),
        ({"min": 1}, "0.99", "x 0.99 is below the minimum 1"),
        ({"min": 1, "max": 2}, 3, "x 3 exceeds the limit 2"),
        ({"max": 100}, "lots", "x must be a number"),
        ({"max": 100}, True, "x must be a number"),  # a bool is not a number here
        ({"equals": False}, False, None),
        ({"equals": False}, True, "x must be False"),
        ({"equals": "a"}, "A", "x must be 'a'"),
        ({"in": ["USD", "EUR"]}, "EUR", None),
        ({"in": ["USD", "EUR"]}, "GBP", "x must be one of USD, EUR"),
        ({"pattern": "[a-z]+"}, "abc", None),
        ({"pattern": "[a-z]+"}, "abc1", "x does not match the allowed pattern"),  # whole value
        ({"pattern": "[a-z]+"}, "1abc", "x does not match the allowed pattern"),
        ({"fact": "customer_id"}, "cus_1", None),
        ({"fact": "customer_id"}, " cus_1 ", None),
        ({"fact": "customer_id"}, "CUS_1", "x must be the run's own customer_id"),
        ({"fact": "customer_email"}, "jane@initech.TEST", None),  # addresses ignore case
        (
            {"fact": "customer_email"},
            "jane@initech.test.evil",
            "x must be the run's own customer_email",
        ),
        ({"fact": "ticket"}, "T-1", "the run has no ticket, so x cannot be checked"),
        ({"domain_of": "customer_email"}, "bob@INITECH.test", None),
        ({"domain_of": "customer_email"}, "bob@evil.test", "x must be an address at initech.test"),
        (
            {"domain_of": "customer_email"},
            "bob@x@initech.test",
            "x must be an address at initech.test",
        ),
        ({"domain_of": "customer_email"}, "initech.test", "x must be an address at initech.test"),
        ({"domain_of": "ticket"}, "a@b.test", "ticket is unknown, so x cannot be checked"),
    ],
)
def test_each_bound_holds_at_its_edge(
    bounds: dict[str, Any], value: Any, problem: str | None
) -> None:
    assert constraint(**bounds).violation({"x": value}, FACTS) == problem


def test_a_constrained_field_must_be_present() -> None:
    assert constraint(max=1).violation({"y": 1}, FACTS) == "x is required by a constraint"
    assert constraint().violation({"x": "anything"}, FACTS) is None


def test_every_set_bound_must_hold() -> None:
    both = constraint(max=100, **{"in": ["5", "500"]})
    assert both.violation({"x": "5"}, FACTS) is None
    assert both.violation({"x": "500"}, FACTS) == "x 500 exceeds the limit 100"
    assert both.violation({"x": "50"}, FACTS) == "x must be one of 5, 500"


def test_a_domain_of_an_address_without_a_domain_is_unknown() -> None:
    facts = {"customer_email": "jane@"}
    problem = constraint(domain_of="customer_email").violation({"x": "a@b.test"}, facts)
    assert problem == "customer_email is unknown, so x cannot be checked"


@pytest.mark.parametrize("bound", ["40.00", 40, "1e2", ".5", "-3"])
def test_bounds_take_numbers_and_plain_decimal_strings(bound: Any) -> None:
    assert constraint(max=bound).max == Decimal(str(bound))


@pytest.mark.parametrize("bound", ["", "1_000", " 1", "ten", "0x10"])
def test_bounds_refuse_what_the_schema_does_not_promise(bound: str) -> None:
    with pytest.raises(
        ValidationError,
        match=r"Value error, must be a number or a decimal string such as 40\.00 \[",
    ):
        constraint(max=bound)


def test_a_pattern_must_compile() -> None:
    with pytest.raises(ValidationError, match="not a regular expression"):
        constraint(pattern="(")
    assert constraint(pattern=None).pattern is None


def test_policy_files_refuse_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        parse_policy({"roles": {"r": {"rights": [], "grnats": []}}})
    with pytest.raises(ValidationError):
        Constraint.model_validate({"field": "x", "maximum": 3})


# --- grants and rules -----------------------------------------------------------------------


def grant(action: str, resource: str, *constraints: Constraint, rule: str = "", **kw: Any) -> Grant:
    return Grant.model_validate(
        {"action": action, "resource": resource, "constraints": constraints, "rule": rule, **kw}
    )


@pytest.mark.parametrize(
    ("action", "resource", "matches"),
    [
        ("read", "customer", True),
        ("execute", "customer", False),
        ("read", "refund", False),
    ],
)
def test_a_grant_matches_its_action_and_resource(action: str, resource: str, matches: bool) -> None:
    assert grant("read", "customer").matches(action, resource) is matches
    assert grant("*", "customer").matches(action, "customer") is True
    assert grant("read", "*").matches("read", resource) is True
    assert grant("*", "*").matches(action, resource) is True


def test_rules_are_named_after_where_they_are_declared() -> None:
    policy = shipped()
    # The platform's grant (read:document) comes first, then the application's own.
    document, customer, reply = policy.roles["requester"].grants[:3]
    assert (document.rule, customer.rule, reply.rule) == (
        "role:requester/read:document#0",
        "role:requester/read:customer#1",
        "role:requester/draft:reply#2",
    )
    assert policy.agents["support-agent"].grants[0].rule == "agent:support-agent/read:customer#0"
    named = parse_policy(
        {"roles": {"r": {"grants": [{"action": "read", "resource": "x", "rule": "mine"}]}}}
    )
    assert named.roles["r"].grants[0].rule == "mine"  # a rule already named keeps its name


def only(
    *allows: Grant, denies: tuple[Override, ...] = (), gates: tuple[Override, ...] = ()
) -> Grants:
    return Grants(allows=allows, denies=denies, gates=gates)


def override(effect: str, action: str = "read", resource: str = "customer", **kw: Any) -> Override:
    return Override.model_validate(
        {
            "id": kw.pop("id", 7),
            "subject_kind": kw.pop("subject_kind", "role"),
            "subject": kw.pop("subject", "requester"),
            "effect": effect,
            "action": action,
            "resource": resource,
            **kw,
        }
    )


def test_nothing_granted_is_denied() -> None:
    verdict = evaluate(only(grant("read", "customer", rule="g")), "execute", "refund", {}, FACTS)
    assert verdict == Verdict(
        effect="deny", rule="default-deny", reason="no grant for execute on refund"
    )
    assert not verdict.allowed


def test_a_matching_grant_allows_and_names_itself() -> None:
    verdict = evaluate(only(grant("read", "customer", rule="g")), "read", "customer", {}, FACTS)
    assert verdict == Verdict(effect="allow", rule="g")
    assert verdict.allowed


def test_a_violated_constraint_denies_with_the_first_violating_grant() -> None:
    small = grant("execute", "refund", constraint(max=10), rule="small")
    medium = grant("execute", "refund", constraint(max=50), rule="medium")
    verdict = evaluate(only(small, medium), "execute", "refund", {"x": 80}, FACTS)
    assert verdict == Verdict(effect="deny", rule="small", reason="x 80 exceeds the limit 10")
    # One grant that passes is enough.
    assert evaluate(only(small, medium), "execute", "refund", {"x": 30}, FACTS).rule == "medium"


def test_a_direct_grant_is_preferred_to_one_that_needs_approval() -> None:
    gated = grant("execute", "refund", rule="gated", requires_approval=("finance",))
    direct = grant("execute", "refund", constraint(max=10), rule="direct")
    assert evaluate(only(gated, direct), "execute", "refund", {"x": 5}, FACTS) == Verdict(
        effect="allow", rule="direct"
    )
    assert evaluate(only(gated, direct), "execute", "refund", {"x": 50}, FACTS) == Verdict(
        effect="approval", rule="gated", reason="requires approval", approver_roles=("finance",)
    )


def test_a_deny_override_wins_over_every_grant() -> None:
    verdict = evaluate(
        only(grant("read", "customer", rule="g"), denies=(override("deny", "*", "customer"),)),
        "read",
        "customer",
        {},
        FACTS,
    )
    assert verdict == Verdict(effect="deny", rule="override:7", reason="denied by override")
    elsewhere = only(
        grant("read", "customer", rule="g"), denies=(override("deny", "read", "refund"),)
    )
    assert evaluate(elsewhere, "read", "customer", {}, FACTS).allowed


def test_an_approve_override_gates_what_would_be_allowed() -> None:
    gate = override("approve", "read", "customer", id=9, requires_approval=("admin",))
    gated = only(grant("read", "customer", rule="g"), gates=(gate,))
    assert evaluate(gated, "read", "customer", {}, FACTS) == Verdict(
        effect="approval",
        rule="override:9",
        reason="the tenant requires approval",
        approver_roles=("admin",),
    )
    # It never turns a refusal into an approval, and gates only what it names.
    assert evaluate(gated, "draft", "reply", {}, FACTS).rule == "default-deny"
    other = only(grant("draft", "reply", rule="d"), gates=(gate,))
    assert evaluate(other, "draft", "reply", {}, FACTS) == Verdict(effect="allow", rule="d")


def test_overrides_apply_to_their_subject_only() -> None:
    policy = shipped()
    extra = override("allow", "execute", "refund", id=3, subject_kind="principal", subject="ann")
    deny = override("deny", "read", "customer", id=4, subject_kind="role", subject="approver")
    agent_deny = override(
        "deny", "draft", "reply", id=5, subject_kind="agent", subject="support-agent"
    )
    overrides = [extra, deny, agent_deny]
    ann = policy.user_grants(["approver"], "ann", overrides)
    assert [g.rule for g in ann.allows][-1] == "override:3"
    assert ann.denies == (deny,)
    bob = policy.user_grants(["requester"], "bob", overrides)
    assert "override:3" not in [g.rule for g in bob.allows]
    assert bob.denies == ()
    assert policy.agent_grants("support-agent", overrides).denies == (agent_deny,)
    assert policy.agent_grants("doc-qa", overrides).denies == ()
    assert policy.agent_grants("no-such-agent").allows == ()
    assert policy.user_grants(["no-such-role"], "ann").allows == ()


def test_an_allow_override_brings_its_constraints_and_approvals() -> None:
    policy = shipped()
    bounded = override(
        "allow",
        "execute",
        "refund",
        id=11,
        subject="approver",
        constraints=({"field": "amount", "max": 20},),
        requires_approval=("admin",),
    )
    grants = policy.user_grants(["approver"], "bob", [bounded])
    assert evaluate(grants, "execute", "refund", {"amount": "30"}, FACTS) == Verdict(
        effect="deny", rule="override:11", reason="amount 30 exceeds the limit 20"
    )
    assert evaluate(grants, "execute", "refund", {"amount": "20"}, FACTS) == Verdict(
        effect="approval", rule="override:11", reason="requires approval", approver_roles=("admin",)
    )


def test_an_approve_override_gates_a_users_grant() -> None:
    policy = shipped()
    gate = override(
        "approve", "read", "customer", id=12, subject="approver", requires_approval=("admin",)
    )
    grants = policy.user_grants(["approver"], "bob", [gate])
    assert (grants.gates, grants.denies) == ((gate,), ())
    assert "override:12" not in [g.rule for g in grants.allows]
    verdict = evaluate(grants, "read", "customer", {"restricted": False}, FACTS)
    assert (verdict.effect, verdict.rule, verdict.approver_roles) == (
        "approval",
        "override:12",
        ("admin",),
    )


# --- the agent acting for a user ------------------------------------------------------------

ALLOW_A = Verdict(effect="allow", rule="a")
ALLOW_U = Verdict(effect="allow", rule="u")


def test_both_must_allow() -> None:
    assert combine(ALLOW_A, ALLOW_U) == Verdict(effect="allow", rule="a & u")
    deny = Verdict(effect="deny", rule="d", reason="no")
    assert combine(deny, ALLOW_U) == Verdict(effect="deny", rule="d", reason="agent: no")
    assert combine(ALLOW_A, deny) == Verdict(effect="deny", rule="d", reason="user: no")
    other = Verdict(effect="deny", rule="e", reason="never")
    assert combine(deny, other).reason == "agent: no"


def test_a_deny_beats_an_approval_on_either_side() -> None:
    deny = Verdict(effect="deny", rule="d", reason="no")
    approval = Verdict(effect="approval", rule="p", approver_roles=("finance",))
    assert combine(approval, deny).effect == "deny"
    assert combine(deny, approval).effect == "deny"


def test_an_approval_either_side_requires_requires_it_from_both_sides_roles() -> None:
    agent = Verdict(effect="approval", rule="pa", approver_roles=("finance", "admin"))
    user = Verdict(effect="approval", rule="pu", approver_roles=("admin", "legal"))
    assert combine(agent, user) == Verdict(
        effect="approval",
        rule="pa",
        reason="requires approval",
        approver_roles=("finance", "admin", "legal"),
    )
    assert combine(ALLOW_A, user) == Verdict(
        effect="approval", rule="pu", reason="requires approval", approver_roles=("admin", "legal")
    )
    assert combine(agent, ALLOW_U).rule == "pa"


# --- API rights -----------------------------------------------------------------------------


def test_rights_by_name_area_or_wildcard() -> None:
    policy = parse_policy(
        {
            "roles": {
                "reader": {"rights": ["runs:read"]},
                "runner": {"rights": ["runs:*"]},
                "admin": {"rights": ["*"]},
                "operator": {"rights": ["platform:codec"]},
            }
        }
    )
    assert policy.has_right(["reader"], "runs:read")
    assert not policy.has_right(["reader"], "runs:start")
    assert policy.has_right(["runner"], "runs:start")
    assert not policy.has_right(["runner"], "usage:read")
    assert policy.has_right(["runner"], "runs:cancel:own")  # the area is the first part
    assert policy.has_right(["nobody", "admin"], "usage:read")
    assert not policy.has_right(["nobody"], "usage:read")
    assert not policy.has_right([], "runs:read")
    # Platform rights reach beyond a tenant: granted by name only, never by a wildcard.
    assert not policy.has_right(["admin"], "platform:codec")
    assert policy.has_right(["operator"], "platform:codec")
    assert policy.platform_roles == frozenset({"operator"})


def test_the_shipped_policy_keeps_its_promises() -> None:
    """The README's claims about policies/permissions.yaml, evaluated."""
    policy = shipped()
    requester = policy.user_grants(["requester"], "ann")
    agent = policy.agent_grants("support-agent")
    refund = {"customer_id": "cus_1", "amount": "40.00", "currency": "USD"}
    both = combine(
        evaluate(agent, "execute", "refund", refund, FACTS),
        evaluate(requester, "execute", "refund", refund, FACTS),
    )
    assert (both.effect, both.approver_roles) == ("approval", ("finance", "admin"))
    too_much = {**refund, "amount": "100.01"}
    assert evaluate(requester, "execute", "refund", too_much, FACTS).effect == "deny"
    restricted = {"restricted": True, "customer_id": "cus_1"}
    assert evaluate(requester, "read", "customer", restricted, FACTS).effect == "deny"
    approver = policy.user_grants(["approver"], "bob")
    assert evaluate(approver, "read", "customer", restricted, FACTS).allowed
    assert (
        evaluate(policy.agent_grants("summarize"), "read", "customer", {}, FACTS).effect == "deny"
    )
    assert policy.platform_roles == frozenset({"operator"})
