"""One way to connect to Temporal, for the API, the worker and the CLI.

Temporal's own client configuration (`TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`,
`TEMPORAL_API_KEY`, `TEMPORAL_TLS_*`, `TEMPORAL_PROFILE` and its TOML profile file) is read
first; Stead's settings override what they set explicitly. Payloads go through the pydantic
data converter and, when keys are configured, the AES-GCM codec: nothing a model reads or writes
is stored in clear in Temporal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from temporalio.client import Client, Interceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    ExternalStorage,
    StorageDriver,
)
from temporalio.envconfig import ClientConfig
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from stead.config import Settings


def data_converter(settings: Settings, payload_store: StorageDriver | None = None) -> DataConverter:
    """Pydantic payloads, encrypted by the codec when keys are set, and those above
    `STEAD_PAYLOAD_OFFLOAD_BYTES` kept in `payload_store` (after encryption) with only a
    hash in the history."""
    converter = pydantic_data_converter
    keys = settings.encryption_keys
    if keys:
        from stead.codec import EncryptionCodec  # noqa: PLC0415  # optional dependency path

        converter = dataclasses.replace(
            converter,
            payload_codec=EncryptionCodec(keys, allow_plaintext=settings.payload_allow_plaintext),
            # Failure messages and stack traces become encoded payloads too.
            failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
        )
    if payload_store is not None and settings.payload_offload_bytes:
        converter = dataclasses.replace(
            converter,
            external_storage=ExternalStorage(
                drivers=[payload_store], payload_size_threshold=settings.payload_offload_bytes
            ),
        )
    return converter


def connect_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = dict(ClientConfig.load_client_connect_config())
    if settings.temporal_address or "target_host" not in options:
        options["target_host"] = settings.temporal_target
    if settings.temporal_namespace != "default" or "namespace" not in options:
        options["namespace"] = settings.temporal_namespace
    if settings.temporal_api_key is not None:
        options["api_key"] = settings.temporal_api_key.get_secret_value()
    if settings.temporal_tls or settings.temporal_tls_cert:
        options["tls"] = TLSConfig(
            client_cert=settings.temporal_tls_cert.read_bytes()
            if settings.temporal_tls_cert
            else None,
            client_private_key=settings.temporal_tls_key.read_bytes()
            if settings.temporal_tls_key
            else None,
            server_root_ca_cert=settings.temporal_tls_ca.read_bytes()
            if settings.temporal_tls_ca
            else None,
        )
    elif options.get("api_key") and "tls" not in options:
        options["tls"] = True  # Temporal Cloud API keys need TLS
    return options


# Dynamic config for every dev server Stead starts (stead dev and the test fixtures).
DEV_SERVER_CONFIG = {
    # The default transfer-queue poll rate adds ~150 ms to every workflow start.
    "history.transferProcessorMaxPollRPS": "1000",
    # Per-tenant fairness on task queues: one busy tenant cannot starve the others. One
    # partition per queue keeps the fairness accounting in one place on a single node.
    "matching.enableFairness": "true",
    "matching.numTaskqueueReadPartitions": "1",
    "matching.numTaskqueueWritePartitions": "1",
    # Flag a run whose workflow task failed twice in a row (`TemporalReportedProblems`), so
    # stuck runs can be listed (`GET /v1/runs?stuck=true`) and counted.
    "system.numConsecutiveWorkflowTaskProblemsToTriggerSearchAttribute": "2",
}


def dev_server_args() -> list[str]:
    args: list[str] = []
    for key, value in DEV_SERVER_CONFIG.items():
        args += ["--dynamic-config-value", f"{key}={value}"]
    return args


async def connect(
    settings: Settings,
    *,
    interceptors: list[Interceptor] | None = None,
    runtime: Runtime | None = None,
    payload_store: StorageDriver | None = None,
) -> Client:
    options = connect_options(settings)
    return await Client.connect(
        options.pop("target_host"),
        data_converter=data_converter(settings, payload_store),
        interceptors=interceptors or [],
        runtime=runtime,
        **options,
    )


async def ensure_search_attributes(client: Client) -> list[str]:
    """Register Stead's search attributes on the client's namespace; return those added.

    For clusters Stead does not start itself (a self-hosted cluster; Temporal Cloud registers
    them through its own API or tcld instead).
    """
    from temporalio.api.enums.v1 import IndexedValueType  # noqa: PLC0415
    from temporalio.api.operatorservice.v1 import (  # noqa: PLC0415
        AddSearchAttributesRequest,
        ListSearchAttributesRequest,
    )

    from stead.search import SEARCH_ATTRIBUTES  # noqa: PLC0415

    kinds = {
        "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
        "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
        "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
        "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    }
    from temporalio.service import RPCError, RPCStatusCode  # noqa: PLC0415

    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        existing = set(listed.custom_attributes)
    except RPCError as exc:
        # The time-skipping test server can add attributes but not list them.
        if exc.status is not RPCStatusCode.UNIMPLEMENTED:
            raise
        existing = set()
    missing = {
        name: kinds[kind] for name, kind in SEARCH_ATTRIBUTES.items() if name not in existing
    }
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
    return sorted(missing)
