"""Integrations: the third-party HTTP APIs an application's tools act on, as configuration.

An application declares an integration by name, with the scopes its credential is expected to
hold; where it is and with what credential it is reached is configuration, read at start:

    STEAD_INTEGRATION_<NAME>_URL      base URL, e.g. https://api.payments.example
    STEAD_INTEGRATION_<NAME>_TOKEN    the bearer credential (never reaches a prompt or a log)
    STEAD_INTEGRATION_<NAME>_SCOPES   comma-separated: what the credential is scoped to
                                      (default: the scopes the application declared)

or the same keys in the YAML file `STEAD_INTEGRATIONS_FILE` names (`<name>: {url, token,
scopes}`; the environment wins). `<NAME>` is the name upper-cased with `-` as `_`. A tool is
refused when its integration's scopes lack what the tool needs, whatever the caller's grants.

Tools reach their integration through `IntegrationClient` (on `ToolContext.integration`):
GET and POST relative to the base URL with the credential, and for POST the call's
idempotency key, so a retried activity never acts twice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from stead.errors import ErrorType, failure

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Integration:
    """A third-party API an application's tools act on.

    `scopes`: what the credential is expected to be scoped to, unless configuration says
    otherwise. `dev_app`: a factory of a loopback stand-in (an ASGI app taking the token) that
    `stead dev` serves when the integration is not configured, so a newcomer's first run works.
    `required`: a worker refuses to start without the integration's configuration (otherwise
    its tools are refused at call time, said once at start).
    """

    name: str
    scopes: tuple[str, ...] = ()
    description: str = ""
    required: bool = True
    dev_app: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"integration name {self.name!r}: lowercase letters, digits and -")

    @property
    def env_prefix(self) -> str:
        return f"STEAD_INTEGRATION_{self.name.upper().replace('-', '_')}_"


class IntegrationConfig(BaseModel):
    """Where an integration is and what its credential may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://[^\s]+$")
    token: SecretStr
    scopes: tuple[str, ...]


class IntegrationConfigError(Exception):
    """One line naming the variable or file entry that is wrong."""


def configure(
    integrations: Mapping[str, Integration],
    environ: Mapping[str, str] | None = None,
    file: Path | None = None,
) -> dict[str, IntegrationConfig]:
    """The configuration of every declared integration that has one; raises
    IntegrationConfigError for one that is half-configured or invalid."""
    environ = os.environ if environ is None else environ
    from_file: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise IntegrationConfigError(f"{file}: {type(exc).__name__}") from None
        if not isinstance(loaded, dict):
            raise IntegrationConfigError(f"{file}: must map integration names to settings")
        from_file = loaded
    found: dict[str, IntegrationConfig] = {}
    for name, integration in integrations.items():
        prefix = integration.env_prefix
        raw: dict[str, Any] = dict(from_file.get(name) or {})
        for key in ("url", "token", "scopes"):
            if f"{prefix}{key.upper()}" in environ:
                raw[key] = environ[f"{prefix}{key.upper()}"]
        if not raw:
            continue
        if isinstance(raw.get("scopes"), str):
            raw["scopes"] = tuple(s.strip() for s in raw["scopes"].split(",") if s.strip())
        raw.setdefault("scopes", integration.scopes)
        try:
            found[name] = IntegrationConfig.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = str(first["loc"][0]) if first["loc"] else "?"
            # Never the value: it may be the credential.
            raise IntegrationConfigError(
                f"integration {name}: {prefix}{where.upper()}: {first['msg']}"
            ) from None
    return found


class IntegrationClient:
    """HTTP to one configured integration, with its credential. Errors an activity should
    retry (unreachable, 5xx, 429) raise a retryable failure; a refusal (other 4xx) raises
    `ToolRefused`, which the gateway reports to the model without retrying."""

    def __init__(
        self, integration: Integration, config: IntegrationConfig | None, http: httpx.AsyncClient
    ) -> None:
        self.integration = integration
        self._config = config
        self._http = http

    @property
    def configured(self) -> bool:
        return self._config is not None

    @property
    def scopes(self) -> tuple[str, ...]:
        return self._config.scopes if self._config is not None else ()

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return await self._send("GET", path, params=params)

    async def post(self, path: str, body: Mapping[str, Any], *, idempotency_key: str) -> Any:
        return await self._send("POST", path, json=dict(body), idempotency_key=idempotency_key)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        from stead.tools import ToolRefused  # noqa: PLC0415  # tools imports this module

        name = self.integration.name
        if self._config is None:
            raise failure(
                ErrorType.INTEGRATION_MISSING,
                f"the {name} integration is not configured ({self.integration.env_prefix}URL)",
            )
        headers = {"Authorization": f"Bearer {self._config.token.get_secret_value()}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            response = await self._http.request(
                method,
                self._config.url.rstrip("/") + path,
                json=json,
                params=dict(params) if params else None,
                headers=headers,
            )
        except httpx.HTTPError as exc:
            raise failure(
                ErrorType.TOOL_FAILED, f"{name} unreachable: {type(exc).__name__}"
            ) from None
        if response.status_code >= 500 or response.status_code == 429:
            raise failure(ErrorType.TOOL_FAILED, f"{name} answered {response.status_code}")
        if response.status_code >= 400:
            raise ToolRefused(f"{name} refused the request ({response.status_code})")
        return response.json()
