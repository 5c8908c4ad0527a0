"""Attestations as pure computation: what a signature binds, key rotation, derived keys. The
validator that checks them inside a run is tested on real workflows in
tests/test_forged_messages.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from stead.attest import Attestor, _check, derive_keys, digest
from stead.errors import ErrorType

CLAIM: dict[str, Any] = {"approval_id": "ap_1", "principal": "ann", "roles": ["approver"]}
RUN = "acme:r_1"
OLD, NEW = ("old", b"o" * 32), ("new", b"n" * 32)


def test_a_signature_verifies_for_its_run_and_claim_only() -> None:
    attestor = Attestor([NEW])
    token = attestor.sign(RUN, CLAIM)
    assert token.startswith("new:")
    assert attestor.verify(RUN, CLAIM, token)
    assert not attestor.verify("acme:r_2", CLAIM, token)
    assert not attestor.verify(RUN, {**CLAIM, "roles": ["admin"]}, token)
    assert not attestor.verify(RUN, {**CLAIM, "extra": 1}, token)


def test_the_signature_is_an_hmac_of_the_run_and_the_canonical_claim() -> None:
    """Pinned so that API and workers of different versions agree on what is signed."""
    message = json.dumps([RUN, CLAIM], sort_keys=True, separators=(",", ":"))
    mac = hmac.new(NEW[1], message.encode(), hashlib.sha256).digest()
    assert Attestor([NEW]).sign(RUN, CLAIM) == "new:" + base64.urlsafe_b64encode(mac).decode()
    reordered = dict(reversed(list(CLAIM.items())))
    assert Attestor([NEW]).sign(RUN, reordered) == Attestor([NEW]).sign(RUN, CLAIM)


@pytest.mark.parametrize(
    "token",
    ["", "new:", "nokeyid", "other:AAAA", "new:not base64!", "new:" + "A" * 43 + "="],
)
def test_malformed_or_foreign_tokens_do_not_verify(token: str) -> None:
    assert not Attestor([NEW]).verify(RUN, CLAIM, token)


def test_a_token_under_another_key_id_does_not_verify() -> None:
    signed = Attestor([NEW]).sign(RUN, CLAIM)
    relabelled = "old:" + signed.partition(":")[2]
    assert not Attestor([NEW, OLD]).verify(RUN, CLAIM, relabelled)


def test_rotation_signs_with_the_first_key_and_verifies_with_all() -> None:
    before = Attestor([OLD]).sign(RUN, CLAIM)
    rotated = Attestor([NEW, OLD])
    assert rotated.verify(RUN, CLAIM, before)
    after = rotated.sign(RUN, CLAIM)
    assert after.startswith("new:")
    assert not Attestor([OLD]).verify(RUN, CLAIM, after)


def test_an_attestor_needs_a_key() -> None:
    with pytest.raises(ValueError, match=r"^attestation needs at least one key$"):
        Attestor([])


def test_claims_may_carry_times() -> None:
    claim = {**CLAIM, "at": datetime(2026, 3, 1, 12, 0, tzinfo=UTC)}
    attestor = Attestor([NEW])
    assert attestor.verify(RUN, claim, attestor.sign(RUN, claim))


def test_derived_keys_keep_ids_and_are_independent_of_the_payload_keys() -> None:
    derived = derive_keys([OLD, NEW])
    # Pinned: every API and worker holding the payload key must derive this same key.
    assert derived[0][1].hex() == (
        "f7f7e00ab4441e31956052d09b6947728775f05fff501f5cd858fe0eb4cec547"
    )
    assert [key_id for key_id, _ in derived] == ["old", "new"]
    assert all(len(key) == 32 for _, key in derived)
    assert derived[0][1] != OLD[1]
    assert derived[0][1] != derived[1][1]
    assert derive_keys([OLD]) == derived[:1]  # the same on every process that holds OLD


def test_a_digest_is_stable_and_tells_values_apart() -> None:
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert digest("x") == hashlib.sha256(b'"x"').hexdigest()
    compact = hashlib.sha256(b'{"at":"2026-03-01 12:00:00+00:00","n":[1,2]}').hexdigest()
    assert digest({"n": [1, 2], "at": datetime(2026, 3, 1, 12, 0, tzinfo=UTC)}) == compact


class Message:
    """The shape `_check` reads (DecideInput and CancelInput have it)."""

    def __init__(self, attestation: str, attested_at: datetime | None) -> None:
        self.attestation, self.attested_at = attestation, attested_at

    def claim(self) -> dict[str, Any]:
        return CLAIM


NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("attestor", "message", "reason"),
    [
        (
            None,
            Message("new:x", NOW),
            "this worker holds no attestation key, so it accepts no decisions",
        ),
        (
            Attestor([NEW]),
            Message("", NOW),
            "the message carries no attestation: send it through the Stead API",
        ),
        (
            Attestor([NEW]),
            Message("new:x", None),
            "the message carries no attestation: send it through the Stead API",
        ),
        (
            Attestor([NEW]),
            Message("new:x", NOW.replace(tzinfo=None)),  # a time without a zone proves nothing
            "the message carries no attestation: send it through the Stead API",
        ),
    ],
)
def test_unattested_messages_are_refused_before_anything_else(
    attestor: Attestor | None, message: Message, reason: str
) -> None:
    """Refused before the run's clock or id is read (those cases are checked on real
    workflows in tests/test_forged_messages.py)."""
    with pytest.raises(ApplicationError) as refused:
        _check(attestor, message)
    assert (refused.value.message, refused.value.type) == (reason, ErrorType.NOT_ATTESTED)
