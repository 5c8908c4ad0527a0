"""Signing secrets and signatures, in the Standard Webhooks scheme (`standardwebhooks`).

A secret is `whsec_` and 32 random bytes in base64, generated here and shown once; it is kept
sealed with the payload keys, bound to its tenant and endpoint (a sealed secret copied to
another endpoint's row does not open). Each delivery attempt is signed at its own time; the
`webhook-id` is the event's id, the same on every retry and re-delivery, so a receiver
deduplicates by it.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime

from standardwebhooks.webhooks import Webhook

from stead.crypto import Sealer

SECRET_BYTES = 32


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _associated(tenant: str, endpoint_id: str) -> bytes:
    return f"webhook-secret\0{tenant}\0{endpoint_id}".encode()


def seal(sealer: Sealer, tenant: str, endpoint_id: str, secret: str) -> bytes:
    return sealer.seal(secret.encode(), associated=_associated(tenant, endpoint_id))


def unseal(sealer: Sealer, tenant: str, endpoint_id: str, sealed: bytes) -> str:
    return sealer.open(sealed, associated=_associated(tenant, endpoint_id)).decode()


def headers(
    signing_secrets: Sequence[str], event_id: str, at: datetime, body: str
) -> dict[str, str]:
    """The request headers of one attempt: one signature per secret in use (the current one,
    and the previous one while a rotation's grace period lasts), space-separated as the
    scheme allows, so a receiver with either secret verifies."""
    signatures = [Webhook(s).sign(event_id, at, body) for s in signing_secrets]
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
        "user-agent": "Stead-Webhooks/1",
    }
