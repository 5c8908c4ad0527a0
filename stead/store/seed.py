"""Demo data for `stead dev`: two tenants, each with a requester, an approver (who also holds
finance), a finance user (who may approve refunds and nothing else) and an admin, and a
platform operator outside both (for the codec: `temporal workflow show --codec-auth`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from stead.policy.permissions import PLATFORM_TENANT
from stead.store import principals
from stead.store.db import Conn

DEMO_TENANTS = {"acme": ("Acme Corp", "standard"), "globex": ("Globex", "enterprise")}
DEMO_USERS = {
    "requester": ["requester"],
    "approver": ["approver", "finance"],
    "finance": ["finance"],
    "admin": ["admin"],
}


async def seed_demo(
    conn: Conn,
    existing: dict[str, str] | None = None,
    app_seed: Callable[[Any], Awaitable[None]] | None = None,
) -> dict[str, str]:
    """Create the demo tenants and users; return `{"tenant/user": api_key}`.

    Keys in `existing` that still authenticate as the right principal are kept, so restarting
    `stead dev` does not invalidate the keys a developer already copied. `app_seed` writes the
    application's own demo data (`App(seed=...)`).
    """
    keys: dict[str, str] = {}
    async with conn.transaction():
        tenants = {**DEMO_TENANTS, PLATFORM_TENANT: ("Platform", "platform")}
        for tenant, (name, plan) in tenants.items():
            await principals.create_tenant(conn, tenant, name, plan)
            users = {"operator": ["operator"]} if tenant == PLATFORM_TENANT else DEMO_USERS
            for user, roles in users.items():
                await principals.upsert_principal(
                    conn, tenant, user, roles, display_name=f"{name} {user}"
                )
                label = f"{tenant}/{user}"
                old = (existing or {}).get(label)
                found = await principals.authenticate(conn, old) if old else None
                if found is not None and (found.tenant, found.id) == (tenant, user):
                    keys[label] = old  # type: ignore[assignment]  # old is a str when found
                else:
                    keys[label] = await principals.create_key(conn, tenant, user, label="demo")
    if app_seed is not None:
        async with conn.transaction():
            await app_seed(conn)
    return keys
