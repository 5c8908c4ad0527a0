"""Temporal payload codec: AES-GCM encryption of every payload, with key rotation.

Encoded payloads carry `encoding: binary/encrypted` and the key id in their metadata; the
whole original payload (metadata and data) is the plaintext, so the payload's type is hidden
too. Decoding picks the key by id, so payloads written under an older key still decode after a
new key is put first. Failure messages and stack traces are encoded by the failure converter
(`encode_common_attributes`), so errors are not stored in clear either.
"""

from __future__ import annotations

from collections.abc import Sequence

from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from stead.crypto import Sealer

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        self._sealer = Sealer(keys)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [
            Payload(
                metadata={"encoding": ENCODING, KEY_ID: self._sealer.key_id.encode()},
                data=self._sealer.seal(p.SerializeToString()),
            )
            for p in payloads
        ]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        decoded: list[Payload] = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                decoded.append(payload)  # written before encryption was turned on
                continue
            plain = Payload()
            plain.ParseFromString(self._sealer.open(payload.data))
            decoded.append(plain)
        return decoded
