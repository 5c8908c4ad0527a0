"""Stead's testing kit: test an application on the real parts, as Stead tests itself.

Opt in from the project's top-level `conftest.py`, and name the application under test in
the pytest configuration (or override the `stead_app` fixture):

    # conftest.py
    pytest_plugins = ["stead.testing"]

    # pyproject.toml
    [tool.pytest.ini_options]
    stead_app = "worker:APP"                      # else STEAD_APP, else the stead.apps entry point
    asyncio_mode = "auto"
    asyncio_default_fixture_loop_scope = "session"  # the fixtures share one event loop
    asyncio_default_test_loop_scope = "session"

It needs the `testing` extra (`pip install stead[testing]`: pytest, pytest-asyncio, the
time-skipping test server). Fixtures, started once per session unless marked (test):

- `stead_app`: the application; `runtime`: its registries under `settings`;
- `postgres`, `database_url` (the owner's URL, Stead's and the application's migrations
  applied), `app_database_url` and `pool` (the application role's, as in production);
- `temporal` (a real dev server) and `client`; `time_env` (the time-skipping server);
- `sim_url` (the Messages-API simulator behind the tests' scripts), `scripted_model` (test:
  what the model answers, see `ScriptedModel`), `sim` (test: fault injection);
- `integrations`: loopback stand-ins of the application's integrations (each one's
  `dev_app`, or what the `integration_apps` fixture gives), configured in `settings`;
- `settings`, and `test_settings` (test: on the test's own `task_queue`);
- `worker`, `time_worker` (test: the application's workers), `api` (test: an HTTP client
  on its API, in process), `api_for` (test: one for other settings);
- `make_tenant` and `tenant` (test: a fresh tenant with an API key per user), `operator`
  (test: a platform operator's headers).

Each test gets its own tenant and task queue, so nothing is restarted between tests. The
helpers below drive runs over the API; `record_history` and `replay_history` keep committed
histories replaying (see `stead.testing._replay`); `Settings` is the settings fixtures' type.

PYTEST_DONT_REWRITE: a project's conftest imports this module before pytest loads it as a
plugin; it holds no assertion to rewrite (the fixtures' module, loaded by pytest, does).
"""

from stead.config import Settings
from stead.testing._model import ScriptedModel
from stead.testing._parts import (
    PAYLOAD_KEYS,
    Integrations,
    SimControl,
    StandIn,
    Tenant,
    TenantFactory,
    api_client,
    create_tenant,
    declared_integrations,
    running_workers,
    services,
    stand_ins,
    write_integrations,
)
from stead.testing._replay import (
    histories,
    record_history,
    recording,
    replay_failure,
    replay_history,
)
from stead.testing._runs import decide_pending, eventually, start_run, wait_for_run, wait_json

pytest_plugins = ["stead.testing._fixtures"]

__all__ = [
    "PAYLOAD_KEYS",
    "Integrations",
    "ScriptedModel",
    "Settings",
    "SimControl",
    "StandIn",
    "Tenant",
    "TenantFactory",
    "api_client",
    "create_tenant",
    "decide_pending",
    "declared_integrations",
    "eventually",
    "histories",
    "record_history",
    "recording",
    "replay_failure",
    "replay_history",
    "running_workers",
    "services",
    "stand_ins",
    "start_run",
    "wait_for_run",
    "wait_json",
    "write_integrations",
]
