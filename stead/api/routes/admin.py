"""Tenant administration: users, API keys, permission overrides, budgets, approval policies.

Everything here acts on the caller's own tenant (creating tenants is a platform operation:
`stead admin tenant create`). Keys are shown once, at creation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field, ValidationError

from stead.api.deps import CurrentPrincipal, ServicesDep, limited
from stead.api.errors import RATE_LIMITED
from stead.contract import MAX_BUDGET_USD, ApprovalPolicy
from stead.policy.permissions import Constraint, Override
from stead.service.access import Services, require
from stead.service.errors import Conflict, Forbidden, Invalid, NotFound
from stead.service.schemas import Request
from stead.store import approvals as approvals_store
from stead.store import budgets, principals
from stead.store import policy as policy_store
from stead.store.principals import Principal

RIGHT = "admin:manage"
router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[limited("admin.write", RIGHT)],  # writes only
    responses=RATE_LIMITED,
)
PrincipalId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")]


def _admin(svc: Services, principal: Principal) -> None:
    require(svc, principal, RIGHT)


def _known_roles(svc: Services, roles: list[str]) -> list[str]:
    """The roles, checked: each must exist and be one a tenant admin may hand out. Roles that
    carry a `platform:` right reach other tenants (decoding their payloads), so they are made
    only by the platform's own operators, outside tenants (`stead admin operator-create`)."""
    unknown = sorted(set(roles) - set(svc.permissions.roles))
    if unknown:
        known = ", ".join(sorted(set(svc.permissions.roles) - svc.permissions.platform_roles))
        raise Invalid(f"unknown roles: {', '.join(unknown)}; known: {known}")
    platform = sorted(set(roles) & svc.permissions.platform_roles)
    if platform:
        raise Forbidden(
            f"roles {', '.join(platform)} carry platform rights; a tenant admin cannot grant"
            " them (platform operators are made with `stead admin operator-create`)"
        )
    return sorted(set(roles))


class UserIn(Request):
    id: PrincipalId
    roles: list[str] = Field(default_factory=list, max_length=20)
    display_name: str = Field("", max_length=200)


class RolesIn(Request):
    roles: list[str] = Field(max_length=20)


class UserOut(BaseModel):
    id: str
    kind: str
    display_name: str
    roles: list[str]
    keys: list[str]
    created_at: datetime
    disabled_at: datetime | None


class KeyIn(Request):
    label: str = Field("", max_length=200)


class KeyOut(BaseModel):
    key_id: str
    key: str = Field(description="shown once; store it now")


@router.get("/users")
async def list_users(svc: ServicesDep, principal: CurrentPrincipal) -> list[UserOut]:
    _admin(svc, principal)
    async with svc.pool.acquire() as conn:
        rows = await principals.list_principals(conn, principal.tenant)
    return [UserOut.model_validate(r) for r in rows]


@router.post("/users", status_code=status.HTTP_201_CREATED)
async def create_user(body: UserIn, svc: ServicesDep, principal: CurrentPrincipal) -> UserOut:
    _admin(svc, principal)
    roles = _known_roles(svc, body.roles)
    async with svc.pool.acquire() as conn:
        if await principals.get_principal(conn, principal.tenant, body.id) is not None:
            raise Conflict(f"user {body.id!r} already exists")
        await principals.upsert_principal(
            conn, principal.tenant, body.id, roles, display_name=body.display_name
        )
        rows = await principals.list_principals(conn, principal.tenant)
    return UserOut.model_validate(next(r for r in rows if r["id"] == body.id))


@router.put("/users/{user_id}/roles")
async def set_roles(
    user_id: str, body: RolesIn, svc: ServicesDep, principal: CurrentPrincipal
) -> UserOut:
    """Roles take effect on the next request and at every permission re-check (an agent's
    pending action is re-checked after its approval)."""
    _admin(svc, principal)
    roles = _known_roles(svc, body.roles)
    if user_id == principal.id and not svc.permissions.has_right(roles, RIGHT):
        raise Conflict("you cannot remove your own admin rights; ask another admin")
    async with svc.pool.acquire() as conn:
        if not await principals.set_roles(conn, principal.tenant, user_id, roles):
            raise NotFound("no such user")
        rows = await principals.list_principals(conn, principal.tenant)
    return UserOut.model_validate(next(r for r in rows if r["id"] == user_id))


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def disable_user(user_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> Response:
    _admin(svc, principal)
    if user_id == principal.id:
        raise Conflict("you cannot disable yourself")
    async with svc.pool.acquire() as conn:
        if not await principals.disable_principal(conn, principal.tenant, user_id):
            raise NotFound("no such user")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/users/{user_id}/keys", status_code=status.HTTP_201_CREATED)
async def create_key(
    user_id: str, svc: ServicesDep, principal: CurrentPrincipal, body: KeyIn | None = None
) -> KeyOut:
    _admin(svc, principal)
    async with svc.pool.acquire() as conn:
        if await principals.get_principal(conn, principal.tenant, user_id) is None:
            raise NotFound("no such user")
        key = await principals.create_key(
            conn, principal.tenant, user_id, body.label if body else ""
        )
    return KeyOut(key_id=key.split("_")[1], key=key)


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_key(key_id: str, svc: ServicesDep, principal: CurrentPrincipal) -> Response:
    _admin(svc, principal)
    async with svc.pool.acquire() as conn:
        if not await principals.revoke_key(conn, principal.tenant, key_id):
            raise NotFound("no such key")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


class GrantIn(Request):
    subject_kind: Literal["role", "agent", "principal"]
    subject: str = Field(min_length=1, max_length=128)
    effect: Literal["allow", "deny", "approve"]
    action: Literal["read", "draft", "execute", "*"]
    resource: str = Field(min_length=1, max_length=64)
    constraints: list[Constraint] = Field(default_factory=list, max_length=20)
    requires_approval: list[str] = Field(default_factory=list, max_length=10)


@router.get("/grants")
async def list_grants(svc: ServicesDep, principal: CurrentPrincipal) -> list[Override]:
    _admin(svc, principal)
    async with svc.pool.acquire() as conn:
        return await policy_store.overrides(conn, principal.tenant)


@router.post("/grants", status_code=status.HTTP_201_CREATED)
async def add_grant(body: GrantIn, svc: ServicesDep, principal: CurrentPrincipal) -> Override:
    """Tenant override of the file policy: allow adds, deny removes (and wins), approve gates."""
    _admin(svc, principal)
    if body.effect == "approve" and not body.requires_approval:
        raise Invalid("an approve override needs requires_approval roles")
    _known_roles(svc, body.requires_approval)
    if body.subject_kind == "role":
        _known_roles(svc, [body.subject])
    data: dict[str, Any] = body.model_dump(mode="json", by_alias=True, exclude_none=True)
    async with svc.pool.acquire() as conn:
        new_id = await policy_store.add_override(conn, principal.tenant, data, by=principal.id)
    return Override.model_validate({**data, "id": new_id})


@router.delete("/grants/{grant_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_grant(grant_id: int, svc: ServicesDep, principal: CurrentPrincipal) -> Response:
    _admin(svc, principal)
    async with svc.pool.acquire() as conn:
        if not await policy_store.revoke_override(conn, principal.tenant, grant_id):
            raise NotFound("no such grant")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


class BudgetIn(Request):
    scope: Literal["customer", "user"]
    subject: str = Field("", max_length=128, description="the user id for scope=user")
    period: Literal["day", "month"]
    limit_usd: float = Field(ge=0, le=MAX_BUDGET_USD)


class BudgetOut(BaseModel):
    scope: str
    subject: str
    period: str
    limit_usd: float
    spent_usd: float
    reserved_usd: float


@router.get("/budgets")
async def list_budgets(svc: ServicesDep, principal: CurrentPrincipal) -> list[BudgetOut]:
    _admin(svc, principal)
    async with svc.pool.acquire() as conn:
        rows = await budgets.status(conn, principal.tenant)
    return [
        BudgetOut(
            scope=r["scope"],
            subject=r["subject"],
            period=r["period"],
            limit_usd=r["limit_nusd"] / 1e9,
            spent_usd=r["spent_nusd"] / 1e9,
            reserved_usd=r["reserved_nusd"] / 1e9,
        )
        for r in rows
    ]


@router.put("/budgets")
async def set_budget(
    body: BudgetIn, svc: ServicesDep, principal: CurrentPrincipal
) -> list[BudgetOut]:
    _admin(svc, principal)
    if (body.scope == "user") != bool(body.subject):
        raise Invalid("subject names the user for scope=user, and must be empty for scope=customer")
    async with svc.pool.acquire() as conn:
        await budgets.set_budget(
            conn, principal.tenant, body.scope, body.subject, body.period, body.limit_usd
        )
    return await list_budgets(svc, principal)


@router.put("/approval-policies/{pipeline}/{step}")
async def set_approval_policy(
    pipeline: str, step: str, body: dict[str, Any], svc: ServicesDep, principal: CurrentPrincipal
) -> ApprovalPolicy:
    """Override the approval policy of one pipeline step for new runs of this tenant."""
    _admin(svc, principal)
    if pipeline not in svc.runtime.pipelines and pipeline != "*":
        raise Invalid(f"unknown pipeline {pipeline!r}")
    try:
        policy = ApprovalPolicy.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Invalid(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    _known_roles(svc, list(policy.roles))
    async with svc.pool.acquire() as conn:
        await approvals_store.set_override(
            conn, principal.tenant, pipeline, step, policy, principal.id
        )
    return policy
