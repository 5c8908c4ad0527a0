"""Stead's one typed configuration.

Every process (API, worker, simulator, `stead dev`) reads the same `Settings` from the
environment, prefix `STEAD_`. A few well-known names are honoured too: `DATABASE_URL`,
`ANTHROPIC_API_KEY`, and Temporal's own `TEMPORAL_*` client configuration (environment and
profile file), which `stead.temporal.connect` layers under Stead's settings.

Secrets are `SecretStr`: they never appear in a repr, a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import AliasChoices, Field, FilePath, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from stead.attest import Attestor

Environment = Literal["dev", "test", "production"]
# The codec token travels in a URL path, so it must be path-safe; 16+ characters keeps it
# unguessable.
_CODEC_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")


class ConfigError(Exception):
    """A setting is missing or invalid. The message is one line that names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STEAD_", extra="ignore", frozen=True, populate_by_name=True
    )

    env: Environment = "dev"
    data_dir: Path = Path(".stead")
    host: str = "127.0.0.1"

    # Temporal. Unset address: `stead dev` runs the embedded dev server on temporal_port.
    temporal_address: str | None = None
    temporal_namespace: str = "default"
    temporal_api_key: SecretStr | None = None
    temporal_tls: bool = False
    temporal_tls_cert: Path | None = None
    temporal_tls_key: Path | None = None
    temporal_tls_ca: Path | None = None
    temporal_port: int = Field(7233, ge=1, le=65535)
    temporal_ui_port: int = Field(8233, ge=1, le=65535)
    temporal_http_port: int = Field(7243, ge=1, le=65535)
    temporal_metrics_port: int = Field(7244, ge=1, le=65535)
    # Workflows, tools, the ledger and model calls poll `task_queue`. With a model-call rate set,
    # runs started from then on send their model calls to `<task_queue>-model` instead, whose
    # rate the Temporal server enforces across every worker. Unset, model calls stay on the
    # workflow's queue, where Temporal hands them to the same worker eagerly: no matching round
    # trip, measured as a third of the server's CPU per three-step run (bench/throughput).
    task_queue: str = Field("stead", pattern=r"^[A-Za-z0-9._-]{1,200}$")
    model_calls_per_second: float | None = Field(None, gt=0)
    # How often long activities heartbeat, and the most the SDK may delay sending one:
    # cancellation reaches a running activity only through a heartbeat response.
    heartbeat_seconds: float = Field(1.0, gt=0, le=60)
    # Runs a worker keeps in memory between tasks (about 170 KiB each, measured). Runs beyond
    # it are replayed from history when they next wake: parked runs lose nothing by it.
    worker_workflow_cache: int = Field(500, ge=0, le=100_000)

    # PostgreSQL. Unset: `stead dev` runs embedded PostgreSQL under data_dir/pg.
    # The application's login: the role `db_app_role` itself (insert/select on the audit log),
    # never the owner or a superuser; the pool refuses a login that could leave that role.
    database_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("STEAD_DATABASE_URL", "DATABASE_URL")
    )
    db_app_role: str = Field("stead_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # The owner's login, for `stead migrate` and `stead payloads gc` only; give it to no API or
    # worker process. Unset: database_url (which then must be the owner while migrating).
    migrate_database_url: SecretStr | None = None
    db_pool_max: int = Field(10, ge=1, le=200)

    # Model endpoint. With neither base URL nor API key, Stead uses its local simulator.
    model_base_url: str | None = None
    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("STEAD_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    model_timeout_seconds: float = Field(30.0, gt=0, le=600)
    sim_port: int = Field(8300, ge=1, le=65535)

    # The application: `module:attr` of a `stead.App` (or the one `stead.apps` entry point).
    app: str | None = Field(None, pattern=r"^[\w.]+:[\w.]+$")
    # Directories of policy files merged over Stead's defaults and the application's own,
    # separated by `:` (see stead/policy/loader.py).
    policy_path_dirs: str | None = Field(
        None, validation_alias=AliasChoices("STEAD_POLICY_PATH", "STEAD_POLICY_PATH_DIRS")
    )
    # Integrations are configured by STEAD_INTEGRATION_<NAME>_URL/_TOKEN/_SCOPES (see
    # stead/integrations.py), or in this YAML file.
    integrations_file: FilePath | None = None
    # `stead dev` serves the loopback stand-ins of unconfigured integrations from this port up,
    # accepting this token; `stead dev-integrations` serves `name:port,...` of them.
    dev_integrations_port: int = Field(8301, ge=1, le=65500)
    dev_integrations_token: SecretStr | None = None
    dev_integrations: str | None = Field(None, pattern=r"^([a-z][a-z0-9-]*:\d+,?)*$")

    # Traces go to this OTLP/HTTP endpoint when set; nothing is exported otherwise.
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "STEAD_OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
    )

    # HTTP API and metrics.
    api_port: int = Field(8000, ge=1, le=65535)
    worker_metrics_port: int = Field(9464, ge=0, le=65535)
    public_api_url: str | None = None
    # Request limits per plan, replacing the policy path's (stead/policy/defaults/limits.yaml).
    limits_file: FilePath | None = None

    # Payloads larger than this (bytes, after encryption) are kept in PostgreSQL and referenced
    # by hash from the workflow history; 0 keeps everything inline.
    payload_offload_bytes: int = Field(512, ge=0)

    # Payload encryption: comma-separated `key_id:base64key`, the first one encrypts.
    payload_keys: SecretStr | None = None
    # Encrypt Temporal payloads. A process without payload keys refuses to start unless this is
    # explicitly false: a worker missing its keys once wrote plaintext payloads unnoticed.
    payload_encryption: bool = True
    # Accept unencrypted payloads (runs started before encryption was turned on). Off: a
    # plaintext payload, which only something other than Stead can have written, is refused.
    payload_allow_plaintext: bool = False
    # Keys the API signs decisions and cancels with and workers verify (same format). Unset:
    # derived from the payload keys, so sharing those shares these.
    attestation_keys: SecretStr | None = None
    # Origin allowed to call the codec endpoints (the Temporal Web UI).
    ui_origin: str | None = None  # comma-separated when the UI is reached under several names
    # Capability token for `/codec/{token}/...`: the Web UI of the dev server sends neither a
    # bearer token nor cookies to a codec, so its endpoint URL carries the credential.
    codec_token: SecretStr | None = None

    @field_validator("codec_token")
    @classmethod
    def _check_codec_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _CODEC_TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("must be 16-256 URL-safe characters (A-Z a-z 0-9 _ -)")
        return value

    @field_validator("payload_keys", "attestation_keys")
    @classmethod
    def _check_payload_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_payload_keys(value.get_secret_value())
        return value

    @property
    def policy_path(self) -> list[Path]:
        raw = self.policy_path_dirs or ""
        return [Path(p) for p in raw.split(os.pathsep) if p.strip()]

    @property
    def temporal_embedded(self) -> bool:
        return self.temporal_address is None

    @property
    def database_embedded(self) -> bool:
        return self.database_url is None

    @property
    def owner_database_url(self) -> SecretStr | None:
        return self.migrate_database_url or self.database_url

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or f"{self.host}:{self.temporal_port}"

    @property
    def ui_origins(self) -> frozenset[str]:
        raw = self.ui_origin or ""
        return frozenset(o.strip().rstrip("/") for o in raw.split(",") if o.strip())

    @property
    def api_url(self) -> str:
        return self.public_api_url or f"http://{self.host}:{self.api_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.temporal_ui_port}"

    @property
    def model_url(self) -> str | None:
        """Where model calls go; None means Anthropic's own endpoint."""
        if self.model_base_url:
            return self.model_base_url
        if self.anthropic_api_key is not None:
            return None
        return f"http://{self.host}:{self.sim_port}"

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "pg"

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy whose derived keys follow its own settings: pydantic copies the instance's
        `__dict__`, where `cached_property` keeps what it derived from the original's keys."""
        copied = super().model_copy(update=update, deep=deep)
        for name, attribute in vars(Settings).items():
            if isinstance(attribute, cached_property):
                copied.__dict__.pop(name, None)
        return copied

    @cached_property
    def encryption_keys(self) -> list[tuple[str, bytes]]:
        if self.payload_keys is None:
            return []
        return parse_payload_keys(self.payload_keys.get_secret_value())

    def check_serving(self, process: str) -> None:
        """Refuse to run a process that would silently weaken what it guards (`stead dev`
        hands its children keys; every other process must be given them)."""
        if self.payload_encryption and not self.encryption_keys:
            raise ConfigError(
                f"the {process} has no payload keys: set STEAD_PAYLOAD_KEYS (the same in every"
                " process), or STEAD_PAYLOAD_ENCRYPTION=false to keep payloads in clear"
            )
        if self.attestor is None:
            raise ConfigError(
                f"the {process} has no key for decisions: with STEAD_PAYLOAD_ENCRYPTION=false,"
                " set STEAD_ATTESTATION_KEYS (the same in every API and worker process)"
            )

    @cached_property
    def attestor(self) -> Attestor | None:
        """What signs (API) and verifies (workers) attested messages; None without any key."""
        from stead.attest import Attestor, derive_keys  # noqa: PLC0415  # keeps the CLI light

        if self.attestation_keys is not None:
            return Attestor(parse_payload_keys(self.attestation_keys.get_secret_value()))
        keys = self.encryption_keys
        return Attestor(derive_keys(keys)) if keys else None


def parse_payload_keys(raw: str) -> list[tuple[str, bytes]]:
    """Parse `id:base64,id:base64`; raise ValueError without echoing key material."""
    keys: list[tuple[str, bytes]] = []
    for index, part in enumerate(p.strip() for p in raw.split(",") if p.strip()):
        key_id, sep, encoded = part.partition(":")
        if not sep or not key_id:
            raise ValueError(f"entry {index + 1} must look like key_id:base64key")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ValueError(f"key {key_id!r} is not valid base64") from None
        if len(key) not in (16, 24, 32):
            raise ValueError(f"key {key_id!r} must be 16, 24 or 32 bytes for AES-GCM")
        keys.append((key_id, key))
    return keys


def _env_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    info = Settings.model_fields.get(field)
    alias = getattr(info, "validation_alias", None) if info else None
    if isinstance(alias, AliasChoices):
        return " or ".join(str(choice) for choice in alias.choices)
    return f"STEAD_{field.upper()}"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise ConfigError with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]  # pydantic-settings accepts field kwargs
    except ValidationError as exc:
        first = exc.errors()[0]
        # Never echo the input value: it may be a secret.
        raise ConfigError(f"invalid {_env_name(first['loc'])}: {first['msg']}") from None
