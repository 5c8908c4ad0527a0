"""Helpers shared by the codec tests: payloads on the wire, and finding plaintext."""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from temporalio.api.common.v1 import Payload

TEMPORAL = Path(sys.executable).parent / "temporal"
# Makes a run's input larger than the claim-check threshold, so it leaves the history.
FILLER = "The customer asked about the order. " * 100


def payload(value: Any) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


def wire(payloads: Sequence[Payload]) -> dict[str, Any]:
    """Proto-JSON `Payloads`, as the Web UI and the CLI send them."""
    return {
        "payloads": [
            {
                "metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                "data": base64.b64encode(p.data).decode(),
            }
            for p in payloads
        ]
    }


def unwire(body: dict[str, Any]) -> list[Payload]:
    return [
        Payload(
            metadata={k: base64.b64decode(v) for k, v in p.get("metadata", {}).items()},
            data=base64.b64decode(p.get("data", "")),
        )
        for p in body["payloads"]
    ]


_BASE64 = re.compile(rb"[A-Za-z0-9+/_-]{12,}")


def reveals(output: bytes, secret: str) -> bool:
    """Whether `secret` is readable in `output`, directly or inside any base64 run: the CLI's
    JSON shows every payload's data as base64, plaintext or not."""
    needle = secret.encode()
    if needle in output:
        return True
    for run in _BASE64.findall(output):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                if needle in decode(run + b"=" * (-len(run) % 4)):
                    return True
            except (binascii.Error, ValueError):
                continue
    return False
