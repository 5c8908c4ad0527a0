"""The payload codec itself: AES-GCM sealing, key rotation, tampering and refusal of
plaintext."""

from __future__ import annotations

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter

from stead.codec import ENCODING, KEY_ID, REFUSED, EncryptionCodec
from stead.crypto import SealError
from tests.codec_support import payload

OLD_KEY = ("old", b"o" * 32)
NEW_KEY = ("new", b"n" * 32)


async def test_round_trip_hides_data_and_type() -> None:
    codec = EncryptionCodec([NEW_KEY])
    original = payload({"text": "the quarterly numbers"})
    [sealed] = await codec.encode([original])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID] == b"new"
    assert b"quarterly" not in sealed.data
    assert b"json/plain" not in sealed.data  # the original metadata is sealed too
    assert await codec.decode([sealed]) == [original]


async def test_old_key_still_decodes_after_rotation() -> None:
    [sealed] = await EncryptionCodec([OLD_KEY]).encode([payload("before rotation")])
    rotated = EncryptionCodec([NEW_KEY, OLD_KEY])
    assert await rotated.decode([sealed]) == [payload("before rotation")]
    [fresh] = await rotated.encode([payload("after")])
    assert fresh.metadata[KEY_ID] == b"new"  # the first key encrypts


async def test_unknown_key_id_fails_clearly() -> None:
    [sealed] = await EncryptionCodec([OLD_KEY]).encode([payload("x")])
    with pytest.raises(SealError, match="no key with id 'old'"):
        await EncryptionCodec([NEW_KEY]).decode([sealed])


async def test_tampered_ciphertext_fails() -> None:
    codec = EncryptionCodec([NEW_KEY])
    [sealed] = await codec.encode([payload("amount: 100")])
    flipped = bytearray(sealed.data)
    flipped[-1] ^= 1
    tampered = Payload(metadata=dict(sealed.metadata), data=bytes(flipped))
    with pytest.raises(SealError, match="failed authentication"):
        await codec.decode([tampered])


async def test_unencrypted_payloads_are_refused_unless_allowed() -> None:
    """A plaintext payload came from something other than Stead (someone who reached
    Temporal's frontend); only a migration window lets it through."""
    plain = payload({"principal": "forged"})
    [refused] = await EncryptionCodec([NEW_KEY]).decode([plain])
    assert refused.metadata["encoding"] == REFUSED
    assert not refused.data
    with pytest.raises(KeyError, match="refused-plaintext"):
        pydantic_data_converter.payload_converter.from_payload(refused, dict)
    assert await EncryptionCodec([NEW_KEY], allow_plaintext=True).decode([plain]) == [plain]
    # Each payload on its own: a plaintext one neither stops nor shifts the rest.
    mixed = [plain, *(await EncryptionCodec([NEW_KEY]).encode([payload("sealed")])), plain]
    assert await EncryptionCodec([NEW_KEY], allow_plaintext=True).decode(mixed) == [
        plain,
        payload("sealed"),
        plain,
    ]
    assert [p.metadata["encoding"] for p in await EncryptionCodec([NEW_KEY]).decode(mixed)] == [
        REFUSED,
        b"json/plain",
        REFUSED,
    ]
