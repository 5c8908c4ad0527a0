"""Settings fail fast with one line naming the variable, and never echo a secret."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from pydantic import SecretStr

from stead.config import ConfigError, Settings, load_settings


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEAD_API_PORT", "eighty")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "STEAD_API_PORT" in message
    assert "\n" not in message


def test_database_url_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@db/stead")
    settings = load_settings()
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value().endswith("@db/stead")
    assert "hunter2" not in repr(settings)
    assert not settings.database_embedded


def test_bad_payload_key_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = base64.b64encode(b"short-secret").decode()
    monkeypatch.setenv("STEAD_PAYLOAD_KEYS", f"k1:{secret}")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "STEAD_PAYLOAD_KEYS" in str(caught.value)
    assert secret not in str(caught.value)


def test_model_endpoint_defaults_to_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert load_settings().model_url == "http://127.0.0.1:8300"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    assert load_settings().model_url is None  # Anthropic's own endpoint


def test_cli_reports_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stead.cli", "migrate"],
        env={"STEAD_DB_POOL_MAX": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "STEAD_DB_POOL_MAX" in done.stderr


def test_a_copy_derives_its_keys_from_its_own_settings() -> None:
    """A copy without payload keys must not keep the original's (cached) keys or attestor."""
    keyed = Settings(payload_keys=SecretStr("k1:" + base64.b64encode(b"k" * 32).decode()))
    assert keyed.encryption_keys
    assert keyed.attestor is not None
    bare = keyed.model_copy(update={"payload_keys": None})
    assert (bare.encryption_keys, bare.attestor) == ([], None)
