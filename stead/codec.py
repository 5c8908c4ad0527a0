"""Temporal payload codec: AES-GCM encryption of every payload, with key rotation.

Encoded payloads carry `encoding: binary/encrypted` and the key id in their metadata; the
whole original payload (metadata and data) is the plaintext, so the payload's type is hidden
too. Decoding picks the key by id, so payloads written under an older key still decode after a
new key is put first. Failure messages and stack traces are encoded by the failure converter
(`encode_common_attributes`), so errors are not stored in clear either.

Decoding refuses a payload that is not encrypted: anyone who reaches Temporal's frontend could
otherwise start a run, signal it or send it an update with plaintext input of their choosing
and the workers would believe it. Only the codec server (which shows histories, never acts on
them) and a migration window (`STEAD_PAYLOAD_ALLOW_PLAINTEXT`, for runs started before
encryption was turned on) let plaintext through.
"""

from __future__ import annotations

from collections.abc import Sequence

from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from stead.crypto import Sealer

ENCODING = b"binary/encrypted"
# What a refused plaintext payload decodes to: an encoding no payload converter reads, so the
# refusal lands where the value is used, not on the whole workflow task. An update carrying it
# is rejected before anything is written, a signal carrying it is dropped; raising here instead
# would fail every task of the run for as long as the message is pending (a forged plaintext
# update bricked the run that way).
REFUSED = b"binary/refused-plaintext"
KEY_ID = "encryption-key-id"


_REFUSED_PAYLOAD = Payload(metadata={"encoding": REFUSED})


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Sequence[tuple[str, bytes]], *, allow_plaintext: bool = False) -> None:
        self._sealer = Sealer(keys)
        self._allow_plaintext = allow_plaintext

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
                decoded.append(payload if self._allow_plaintext else _REFUSED_PAYLOAD)
                continue
            plain = Payload()
            plain.ParseFromString(self._sealer.open(payload.data))
            decoded.append(plain)
        return decoded
