"""Platform rights stay with the platform: no tenant admin can reach another tenant.

A tenant admin once could create a user with the `operator` role, mint a key and decode every
tenant's Temporal payloads through `/codec/decode`. Every admin route that takes roles is
checked here against every role that carries a `platform:` right.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from stead.policy.permissions import PLATFORM_TENANT, load_policy
from stead.store import principals
from tests.conftest import Tenant

PLATFORM_ROLES = sorted(load_policy().platform_roles)


def role_bearing_requests(role: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every admin request that names roles, each naming `role`."""
    return [
        ("POST", "/v1/admin/users", {"id": "mallory", "roles": [role]}),
        ("PUT", "/v1/admin/users/requester/roles", {"roles": ["requester", role]}),
        (
            "POST",
            "/v1/admin/grants",
            {
                "subject_kind": "role",
                "subject": role,
                "effect": "allow",
                "action": "read",
                "resource": "customer",
            },
        ),
        (
            "POST",
            "/v1/admin/grants",
            {
                "subject_kind": "role",
                "subject": "requester",
                "effect": "approve",
                "action": "execute",
                "resource": "email",
                "requires_approval": [role],
            },
        ),
        ("PUT", "/v1/admin/approval-policies/summarize/review", {"roles": [role]}),
    ]


def test_the_shipped_policy_has_platform_roles() -> None:
    assert PLATFORM_ROLES, "the matrix below would check nothing"


@pytest.mark.parametrize("role", PLATFORM_ROLES)
async def test_no_admin_route_grants_a_platform_role(
    api: httpx.AsyncClient, tenant: Tenant, database_url: str, role: str
) -> None:
    for method, path, body in role_bearing_requests(role):
        response = await api.request(method, path, json=body, headers=tenant.auth("admin"))
        assert response.status_code == 403, (method, path, response.text)
        assert "platform" in response.json()["detail"], (method, path)
    conn = await asyncpg.connect(database_url)
    try:
        requester = await principals.get_principal(conn, tenant.id, "requester")
        assert requester is not None
        assert requester.roles == ("requester",)
        assert await principals.get_principal(conn, tenant.id, "mallory") is None
    finally:
        await conn.close()


async def test_a_platform_role_inside_a_tenant_reaches_nothing(
    api: httpx.AsyncClient, tenant: Tenant, database_url: str
) -> None:
    """Even a row that gives a tenant's user the operator role (an old grant, a hand edit)
    decodes nothing: platform rights count only inside the platform tenant."""
    conn = await asyncpg.connect(database_url)
    try:
        await principals.upsert_principal(conn, tenant.id, "insider", PLATFORM_ROLES)
        key = await principals.create_key(conn, tenant.id, "insider")
    finally:
        await conn.close()
    response = await api.post(
        "/codec/decode", json={"payloads": []}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 403
    assert "platform:codec" in response.json()["detail"]


def stead_cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEAD_")}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [str(Path(sys.executable).parent / "stead"), "admin", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_operators_are_made_by_the_cli_outside_tenants(
    api: httpx.AsyncClient, tenant: Tenant, database_url: str
) -> None:
    made = stead_cli("operator-create", "ops-1", database_url=database_url)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    conn = await asyncpg.connect(database_url)
    try:
        found = await principals.authenticate(conn, key)
    finally:
        await conn.close()
    assert found is not None
    assert (found.tenant, tuple(sorted(found.roles))) == (PLATFORM_TENANT, tuple(PLATFORM_ROLES))
    decoded = await api.post(
        "/codec/decode", json={"payloads": []}, headers={"Authorization": f"Bearer {key}"}
    )
    assert decoded.status_code == 200, decoded.text

    # The CLI's other commands refuse to put platform roles into a tenant, or to make the
    # platform tenant an ordinary one.
    refused = stead_cli(
        "user-create", tenant.id, "eve", "--roles", PLATFORM_ROLES[0], database_url=database_url
    )
    assert refused.returncode == 2
    assert "operator-create" in refused.stderr
    reserved = stead_cli("tenant-create", PLATFORM_TENANT, database_url=database_url)
    assert reserved.returncode == 2
    assert "reserved" in reserved.stderr
