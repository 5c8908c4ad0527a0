"""Run in a project the guide made (the working directory), in a process of its own: this
repository's reference application has the same top-level package names.

Loads the project's `APP` as `stead api` does (its policy files, `STEAD_POLICY_PATH`, the
integrations' `STEAD_INTEGRATION_*` configuration) and prints, as JSON, what the guide's
test checks: the API's routes (its OpenAPI paths), the integrations' configuration, the
loaded permissions and approval rules, the validation of given run inputs, and whether given
histories replay.
Reads `{"inputs": [{"pipeline", "input"}], "histories": [path]}` on stdin.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stead import testing
from stead.api.app import create_app


def main() -> None:
    sys.path.insert(0, os.getcwd())
    from worker import APP  # noqa: PLC0415  # the project's: importable once cwd is on the path

    asked = json.load(sys.stdin)
    settings = testing.Settings(payload_keys=testing.PAYLOAD_KEYS)
    runtime = APP.load(settings)
    api = create_app(settings, runtime=runtime)
    inputs: list[str | None] = []
    for run in asked["inputs"]:
        pipeline = runtime.pipeline(run["pipeline"])
        try:
            assert pipeline is not None, f"no pipeline {run['pipeline']!r}"
            pipeline.input_model.model_validate(run["input"])
            inputs.append(None)
        except (AssertionError, ValidationError) as exc:
            inputs.append(str(exc))
    replays: dict[str, str | None] = {}
    for path in asked["histories"]:
        failure = asyncio.run(testing.replay_failure(Path(path), APP, settings))
        replays[path] = None if failure is None else repr(failure)[:300]
    policies = runtime.policies
    out: dict[str, Any] = {
        "routes": [  # as the API publishes them
            [method.upper(), path]
            for path, operations in api.openapi()["paths"].items()
            for method in operations
        ],
        "integrations": {
            name: {"url": config.url, "scopes": list(config.scopes)}
            for name, config in runtime.configs.items()
        },
        "roles": {
            name: role.model_dump(mode="json", by_alias=True, exclude_defaults=True)
            for name, role in policies.permissions.roles.items()
        },
        "approvals": {
            pipeline: {step: rule.model_dump(mode="json") for step, rule in steps.items()}
            for pipeline, steps in policies.approvals.items()
        },
        "inputs": inputs,
        "replays": replays,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
