"""AES-GCM sealing with key ids, shared by the Temporal payload codec and the audit log.

A sealed blob is `version(1) | key_id_len(1) | key_id | nonce(12) | ciphertext+tag`. The
first configured key encrypts; every configured key decrypts, so keys rotate by prepending a
new one and dropping the old one once nothing sealed with it is still needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = 1


class SealError(Exception):
    """A blob cannot be opened: unknown key id, wrong key, or tampered bytes."""


class Sealer:
    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        for key_id, _ in keys:
            if not 0 < len(key_id.encode()) < 256:
                raise ValueError("key ids must be 1-255 bytes")
        self._primary_id = keys[0][0]
        self._keys = {key_id: AESGCM(key) for key_id, key in keys}

    @property
    def key_id(self) -> str:
        return self._primary_id

    def seal(self, plaintext: bytes, associated: bytes = b"") -> bytes:
        key_id = self._primary_id.encode()
        nonce = os.urandom(12)
        sealed = self._keys[self._primary_id].encrypt(nonce, plaintext, associated)
        return bytes([_VERSION, len(key_id)]) + key_id + nonce + sealed

    def open(self, blob: bytes, associated: bytes = b"") -> bytes:
        if len(blob) < 2 or blob[0] != _VERSION:
            raise SealError("unknown sealed format")
        id_len = blob[1]
        key_id = blob[2 : 2 + id_len].decode(errors="replace")
        aead = self._keys.get(key_id)
        if aead is None:
            raise SealError(f"no key with id {key_id!r}")
        nonce = blob[2 + id_len : 14 + id_len]
        try:
            return aead.decrypt(nonce, blob[14 + id_len :], associated)
        except Exception:
            raise SealError("sealed data failed authentication") from None

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        return blob[2 : 2 + blob[1]].decode(errors="replace") if len(blob) > 2 else ""
