"""Attested messages: what a person asks a run to do carries proof that it passed the API.

Anyone who can reach Temporal's frontend can send a workflow an update. A decision or a cancel
names a principal and roles; without proof, a run would believe whatever a sender wrote. The
API signs each such message after its own authorization check (an HMAC over the run, the
principal, the roles, the decision and a digest of everything else it carries, and the time)
with a key the workers hold; the workers verify it in the update's validator, before anything
is written to the run's history, so an unattested message is refused and leaves no trace.

Verification is pure computation (no clock but the workflow's, no I/O), so it is safe inside a
workflow. Validators do not run on replay, so rotating keys never breaks old histories.

Keys: `STEAD_ATTESTATION_KEYS` (`id:base64,...`, the first one signs), or, unset, keys derived
from the payload keys with HKDF, so a deployment that shares payload keys already shares these.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from temporalio import workflow
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    HandleUpdateInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from stead.errors import ErrorType

# How far an attestation's time may be from the run's own clock: covers a worker that picks
# the update up a little late, and a little clock skew between API and workers.
FRESHNESS = timedelta(minutes=10)
_DERIVATION_INFO = b"stead attestation v1"


@runtime_checkable
class Attested(Protocol):
    """A message that must carry an attestation: its `claim` is what the API signed."""

    attestation: str
    attested_at: datetime | None

    def claim(self) -> dict[str, Any]: ...


def derive_keys(payload_keys: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Attestation keys derived from payload keys: same ids, independent key material."""
    derived = []
    for key_id, key in payload_keys:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DERIVATION_INFO)
        derived.append((key_id, hkdf.derive(key)))
    return derived


def digest(value: Any) -> str:
    """A stable digest of a JSON-able value (edits, comments) for a claim."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Attestor:
    """Signs and verifies claims. The first key signs; every key verifies (rotation)."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("attestation needs at least one key")
        self._signing_id = keys[0][0]
        self._keys = dict(keys)

    def sign(self, workflow_id: str, claim: dict[str, Any]) -> str:
        mac = self._mac(self._keys[self._signing_id], workflow_id, claim)
        return f"{self._signing_id}:{base64.urlsafe_b64encode(mac).decode()}"

    def verify(self, workflow_id: str, claim: dict[str, Any], token: str) -> bool:
        key_id, _, encoded = token.rpartition(":")
        key = self._keys.get(key_id)
        if key is None:
            return False
        try:
            given = base64.urlsafe_b64decode(encoded.encode())
        except ValueError:
            return False
        return hmac.compare_digest(given, self._mac(key, workflow_id, claim))

    @staticmethod
    def _mac(key: bytes, workflow_id: str, claim: dict[str, Any]) -> bytes:
        # The workflow id binds the claim to one run: a decision for one run is worthless in
        # another, even of the same tenant.
        message = json.dumps(
            [workflow_id, claim], sort_keys=True, separators=(",", ":"), default=str
        )
        return hmac.new(key, message.encode(), hashlib.sha256).digest()


class AttestationInterceptor(Interceptor):
    """Refuses, in the validator, every update whose argument is `Attested` but whose
    attestation is missing, forged, for another run, or stale. A worker without keys refuses
    them all: it fails closed."""

    def __init__(self, attestor: Attestor | None) -> None:
        self._attestor = attestor

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        attestor = self._attestor

        class _Inbound(WorkflowInboundInterceptor):
            def handle_update_validator(self, input: HandleUpdateInput) -> None:
                for arg in input.args:
                    if isinstance(arg, Attested):
                        _check(attestor, arg)
                self.next.handle_update_validator(input)

        return _Inbound


def _check(attestor: Attestor | None, message: Attested) -> None:
    if attestor is None:
        raise _refused("this worker holds no attestation key, so it accepts no decisions")
    at = message.attested_at
    if not message.attestation or at is None or at.tzinfo is None:
        raise _refused("the message carries no attestation: send it through the Stead API")
    skew = abs(workflow.now() - at)
    if skew > FRESHNESS:
        raise _refused("the attestation is stale: send the request again")
    if not attestor.verify(workflow.info().workflow_id, message.claim(), message.attestation):
        raise _refused("the attestation does not match this message and run")


def _refused(reason: str) -> ApplicationError:
    return ApplicationError(reason, type=ErrorType.NOT_ATTESTED)
