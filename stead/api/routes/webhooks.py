"""/v1/admin/webhooks: a tenant's webhook endpoints and delivery logs (stead.service.webhooks).

Writes count against the plan's `admin.write` limit, like every admin write. The signing
secret is in the answer of the create and of each rotation, and nowhere else.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from stead.api.deps import CurrentPrincipal, ServicesDep, limited
from stead.api.errors import RATE_LIMITED
from stead.service import webhooks
from stead.service.schemas import Page
from stead.service.webhooks import (
    RIGHT,
    DeliveryDetail,
    DeliveryOut,
    DeliveryStatus,
    EndpointCreated,
    EndpointIn,
    EndpointOut,
    EndpointPatch,
    RotateIn,
    SecretOut,
)

router = APIRouter(
    prefix="/v1/admin/webhooks",
    tags=["webhooks"],
    dependencies=[limited("admin.write", RIGHT)],  # writes only
    responses=RATE_LIMITED,
)
# Malformed ids are looked up like others (and not found): a 404, never a 422 that tells
# them apart.
EndpointId = Annotated[str, Path(max_length=100)]
DeliveryId = Annotated[str, Path(max_length=100)]


@router.post("", status_code=status.HTTP_201_CREATED)
async def register(
    body: EndpointIn, svc: ServicesDep, principal: CurrentPrincipal
) -> EndpointCreated:
    """Register an endpoint for some event types; the answer holds its signing secret, once."""
    return await webhooks.register(svc, principal, body)


@router.get("")
async def list_endpoints(svc: ServicesDep, principal: CurrentPrincipal) -> list[EndpointOut]:
    return await webhooks.list_endpoints(svc, principal)


@router.get("/{endpoint_id}")
async def get_endpoint(
    endpoint_id: EndpointId, svc: ServicesDep, principal: CurrentPrincipal
) -> EndpointOut:
    return await webhooks.get_endpoint(svc, principal, endpoint_id)


@router.patch("/{endpoint_id}")
async def update_endpoint(
    endpoint_id: EndpointId, body: EndpointPatch, svc: ServicesDep, principal: CurrentPrincipal
) -> EndpointOut:
    """Change the URL, event types or description; `enabled: true` re-enables an endpoint
    that was disabled (after failing, or by an admin), `false` disables it."""
    return await webhooks.update_endpoint(svc, principal, endpoint_id, body)


@router.delete("/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_endpoint(
    endpoint_id: EndpointId, svc: ServicesDep, principal: CurrentPrincipal
) -> Response:
    await webhooks.delete_endpoint(svc, principal, endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{endpoint_id}/rotate-secret")
async def rotate_secret(
    endpoint_id: EndpointId,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    body: RotateIn | None = None,
) -> SecretOut:
    """A new signing secret, shown once; the previous one keeps signing beside it for
    `keep_previous_seconds` (a day unless said otherwise)."""
    return await webhooks.rotate_secret(svc, principal, endpoint_id, body or RotateIn())


@router.get("/{endpoint_id}/deliveries")
async def list_deliveries(
    endpoint_id: EndpointId,
    svc: ServicesDep,
    principal: CurrentPrincipal,
    delivery_status: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Page[DeliveryOut]:
    return await webhooks.list_deliveries(
        svc, principal, endpoint_id, status=delivery_status, limit=limit, cursor=cursor
    )


@router.get("/{endpoint_id}/deliveries/{delivery_id}")
async def get_delivery(
    endpoint_id: EndpointId, delivery_id: DeliveryId, svc: ServicesDep, principal: CurrentPrincipal
) -> DeliveryDetail:
    """One delivery with every attempt: when, the status code or error, the answer's start."""
    return await webhooks.get_delivery(svc, principal, endpoint_id, delivery_id)


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/redeliver", status_code=status.HTTP_202_ACCEPTED
)
async def redeliver(
    endpoint_id: EndpointId, delivery_id: DeliveryId, svc: ServicesDep, principal: CurrentPrincipal
) -> DeliveryOut:
    """Send the event again as a new delivery, with the same `webhook-id`."""
    return await webhooks.redeliver(svc, principal, endpoint_id, delivery_id)
