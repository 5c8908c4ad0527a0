"""The permission model: API rights per role, grants on resource types, agents, overrides.

Decisions are data, never prompt text. `evaluate` answers one question: may these grants do
`action` on `resource` with these arguments? The answer is a `Verdict` (allow, deny, or allow
after approval by certain roles) that names the rule that decided, for the audit log.

An agent acting for a user is held to the intersection: both its own grants and the user's
must allow the action, every constraint of both applies, and an approval required by either
side is required.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

POLICY_FILE = Path(__file__).parent / "defaults" / "permissions.yaml"
PLATFORM_RIGHT_PREFIX = "platform:"
# Platform operators live here, outside every customer tenant: a principal holds a `platform:`
# right only as a member of this tenant, whose id `stead admin tenant-create` refuses.
PLATFORM_TENANT = "platform"
Action = Literal["read", "draft", "execute", "*"]
Effect = Literal["allow", "deny", "approval"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# A bound as a JSON number or a plain decimal string. pydantic's own schema for a Decimal is
# "number or any string" while it parses only some strings (and some the schema would not
# suggest: "1_000", " 1"), so the API's schema promised what validation refused. Found by the
# schemathesis drill in tests/test_drills.py (`"min": ""` passed the schema, failed parsing).
_DECIMAL_STRING = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$"


def _plain_decimal(value: object) -> object:
    if isinstance(value, str) and not re.fullmatch(_DECIMAL_STRING, value):
        raise ValueError("must be a number or a decimal string such as 40.00")
    return value


Bound = Annotated[
    Decimal,
    BeforeValidator(_plain_decimal),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "pattern": _DECIMAL_STRING}]}),
]


class Constraint(_Strict):
    """A bound on one argument. Every set bound must hold."""

    field: str
    max: Bound | None = None
    min: Bound | None = None
    in_: tuple[str, ...] | None = Field(None, alias="in")
    pattern: str | None = None
    # The argument must equal the trusted fact of this name: a value the run itself holds
    # (the ticket's customer id, that customer's email), never one the model wrote. This is
    # what stops a steered model from refunding or writing to another customer.
    fact: str | None = None
    # The argument is an email address whose domain must equal the domain of the email held
    # in this fact (e.g. anywhere at the customer's own domain). Wider than `fact`: a tenant
    # opts into it with an override.
    domain_of: str | None = None
    # The value must equal this exactly (e.g. `restricted: false` on a record's attributes).
    equals: bool | int | str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                # Not a ValueError, so pydantic let it through: a bad pattern in a tenant
                # override was a 500 (found by the schemathesis drill in tests/test_drills.py).
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    def violation(  # noqa: PLR0911, PLR0912  # one early return per kind of bound reads best
        self, args: Mapping[str, Any], context: Mapping[str, Any]
    ) -> str | None:
        if self.field not in args:
            return f"{self.field} is required by a constraint"
        value = args[self.field]
        if self.max is not None or self.min is not None:
            number = _decimal(value)
            if number is None:
                return f"{self.field} must be a number"
            if self.max is not None and number > self.max:
                return f"{self.field} {number} exceeds the limit {self.max}"
            if self.min is not None and number < self.min:
                return f"{self.field} {number} is below the minimum {self.min}"
        if self.equals is not None and value != self.equals:
            return f"{self.field} must be {self.equals!r}"
        if self.in_ is not None and str(value) not in self.in_:
            return f"{self.field} must be one of {', '.join(self.in_)}"
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value)):
            return f"{self.field} does not match the allowed pattern"
        if self.fact is not None:
            expected = context.get(self.fact)
            if expected is None:
                return f"the run has no {self.fact}, so {self.field} cannot be checked"
            if _comparable(value) != _comparable(expected):
                return f"{self.field} must be the run's own {self.fact}"
        if self.domain_of is not None:
            expected = _domain(context.get(self.domain_of))
            if expected is None:
                return f"{self.domain_of} is unknown, so {self.field} cannot be checked"
            if _domain(value) != expected:
                return f"{self.field} must be an address at {expected}"
        return None


class Grant(_Strict):
    action: Action
    resource: str
    constraints: tuple[Constraint, ...] = ()
    requires_approval: tuple[str, ...] = ()
    rule: str = ""  # filled at load: where this grant came from

    def matches(self, action: str, resource: str) -> bool:
        return self.action in (action, "*") and self.resource in (resource, "*")


class RolePolicy(_Strict):
    rights: tuple[str, ...] = ()
    grants: tuple[Grant, ...] = ()


class AgentPolicy(_Strict):
    grants: tuple[Grant, ...] = ()


class Verdict(_Strict):
    effect: Effect
    rule: str
    reason: str = ""
    approver_roles: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"


class Override(_Strict):
    """A tenant's change to the file policy, stored in PostgreSQL.

    `allow` adds a grant; `deny` removes a capability and always wins; `approve` keeps the
    capability but requires approval by `requires_approval` roles.
    """

    id: int
    subject_kind: Literal["role", "agent", "principal"]
    subject: str
    effect: Literal["allow", "deny", "approve"]
    action: Action
    resource: str
    constraints: tuple[Constraint, ...] = ()
    requires_approval: tuple[str, ...] = ()

    def as_grant(self) -> Grant:
        return Grant(
            action=self.action,
            resource=self.resource,
            constraints=self.constraints,
            requires_approval=self.requires_approval,
            rule=f"override:{self.id}",
        )


@dataclass(frozen=True)
class Grants:
    """What one subject (a user with roles, or an agent) holds after the tenant's overrides."""

    allows: tuple[Grant, ...]
    denies: tuple[Override, ...] = ()
    gates: tuple[Override, ...] = ()


class PermissionPolicy(_Strict):
    roles: dict[str, RolePolicy]
    agents: dict[str, AgentPolicy] = {}

    def with_rules(self) -> PermissionPolicy:
        """Name every grant after where it is declared, so verdicts can cite it."""
        roles = {
            name: role.model_copy(update={"grants": _named(role.grants, f"role:{name}")})
            for name, role in self.roles.items()
        }
        agents = {
            name: agent.model_copy(update={"grants": _named(agent.grants, f"agent:{name}")})
            for name, agent in self.agents.items()
        }
        return PermissionPolicy(roles=roles, agents=agents)

    @property
    def platform_roles(self) -> frozenset[str]:
        """Roles that carry a `platform:` right: they reach beyond one tenant, so no tenant
        admin may grant them (only `stead admin operator-create`, in the platform tenant)."""
        return frozenset(
            name
            for name, role in self.roles.items()
            if any(r.startswith(PLATFORM_RIGHT_PREFIX) for r in role.rights)
        )

    def has_right(self, roles: Iterable[str], right: str) -> bool:
        """Whether any role grants `right`. Platform rights reach across tenants, so no
        wildcard covers them: they must be granted by name."""
        area = right.split(":", 1)[0] + ":*"
        wanted = {right} if right.startswith(PLATFORM_RIGHT_PREFIX) else {"*", right, area}
        for role in roles:
            policy = self.roles.get(role)
            if policy and (wanted & set(policy.rights)):
                return True
        return False

    def user_grants(
        self, roles: Iterable[str], principal: str, overrides: Sequence[Override] = ()
    ) -> Grants:
        roles = list(roles)
        grants = [g for r in roles for g in (self.roles[r].grants if r in self.roles else ())]
        mine = [
            o
            for o in overrides
            if _applies(o, "role", roles) or _applies(o, "principal", [principal])
        ]
        return _with_overrides(grants, mine)

    def agent_grants(self, agent: str, overrides: Sequence[Override] = ()) -> Grants:
        grants = list(self.agents[agent].grants) if agent in self.agents else []
        return _with_overrides(grants, [o for o in overrides if _applies(o, "agent", [agent])])


def _with_overrides(grants: list[Grant], overrides: list[Override]) -> Grants:
    return Grants(
        allows=(*grants, *(o.as_grant() for o in overrides if o.effect == "allow")),
        denies=tuple(o for o in overrides if o.effect == "deny"),
        gates=tuple(o for o in overrides if o.effect == "approve"),
    )


def _applies(override: Override, kind: str, subjects: Iterable[str]) -> bool:
    return override.subject_kind == kind and override.subject in set(subjects)


def _named(grants: Iterable[Grant], prefix: str) -> tuple[Grant, ...]:
    return tuple(
        g.model_copy(update={"rule": g.rule or f"{prefix}/{g.action}:{g.resource}#{i}"})
        for i, g in enumerate(grants)
    )


def evaluate(
    grants: Grants,
    action: str,
    resource: str,
    args: Mapping[str, Any],
    context: Mapping[str, Any],
) -> Verdict:
    for deny in grants.denies:
        if deny.as_grant().matches(action, resource):
            return Verdict(effect="deny", rule=f"override:{deny.id}", reason="denied by override")
    verdict = _from_grants(grants.allows, action, resource, args, context)
    gate = next((g for g in grants.gates if g.as_grant().matches(action, resource)), None)
    if verdict.effect == "allow" and gate is not None:
        return Verdict(
            effect="approval",
            rule=f"override:{gate.id}",
            reason="the tenant requires approval",
            approver_roles=gate.requires_approval,
        )
    return verdict


def _from_grants(
    grants: Sequence[Grant],
    action: str,
    resource: str,
    args: Mapping[str, Any],
    context: Mapping[str, Any],
) -> Verdict:
    matching = [g for g in grants if g.matches(action, resource)]
    if not matching:
        return Verdict(
            effect="deny", rule="default-deny", reason=f"no grant for {action} on {resource}"
        )
    passing: list[Grant] = []
    first_violation: tuple[Grant, str] | None = None
    for grant in matching:
        problem = next((v for c in grant.constraints if (v := c.violation(args, context))), None)
        if problem is None:
            passing.append(grant)
        elif first_violation is None:
            first_violation = (grant, problem)
    if not passing:
        assert first_violation is not None
        return Verdict(effect="deny", rule=first_violation[0].rule, reason=first_violation[1])
    direct = next((g for g in passing if not g.requires_approval), None)
    if direct is not None:
        return Verdict(effect="allow", rule=direct.rule)
    chosen = passing[0]
    return Verdict(
        effect="approval",
        rule=chosen.rule,
        reason="requires approval",
        approver_roles=chosen.requires_approval,
    )


def combine(agent: Verdict, user: Verdict) -> Verdict:
    """The agent-acting-for-user verdict: the stricter of the two."""
    for side, verdict in (("agent", agent), ("user", user)):
        if verdict.effect == "deny":
            return verdict.model_copy(update={"reason": f"{side}: {verdict.reason}"})
    if agent.effect == "approval" or user.effect == "approval":
        roles = tuple(dict.fromkeys((*agent.approver_roles, *user.approver_roles)))
        rule = agent.rule if agent.effect == "approval" else user.rule
        return Verdict(
            effect="approval", rule=rule, reason="requires approval", approver_roles=roles
        )
    return Verdict(effect="allow", rule=f"{agent.rule} & {user.rule}")


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def _comparable(value: Any) -> str:
    """Facts compare as text; an email address case-insensitively (as mail systems route)."""
    text = str(value).strip()
    return text.casefold() if "@" in text else text


def _domain(value: Any) -> str | None:
    if not isinstance(value, str) or value.count("@") != 1:
        return None
    domain = value.rsplit("@", 1)[1].strip().lower()
    return domain or None


def parse_policy(raw: Mapping[str, Any]) -> PermissionPolicy:
    return PermissionPolicy.model_validate(raw).with_rules()


@cache
def load_policy(path: Path = POLICY_FILE) -> PermissionPolicy:
    return parse_policy(yaml.safe_load(path.read_text()))
