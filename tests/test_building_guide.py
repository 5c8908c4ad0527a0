"""docs/building.md, "Build your own pipeline": every code block in it is real.

The guide's own `stead new` commands make the project (tests/guide.py); every excerpt must
be in the file it names, verbatim; every other command must be one these tests check: a
`make` target the project has, a `stead` command Stead's CLI takes, a `curl` to a route the
project's API serves (with a body its pipeline accepts), integration configuration Stead
reads. The policy snippets are loaded on top of the project's, from `STEAD_POLICY_PATH`, and
the guide's edit to a running pipeline must replay the project's committed history, while the
same edit without its `workflow.patched` gate must not. The project is loaded in processes of
its own (tests/guide_probe.py). tests/test_new_app.py type-checks the edit with mypy --strict,
and runs the project's `make test` and `make dev`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from stead.cli import build_parser
from stead.store.seed import DEMO_TENANTS, DEMO_USERS
from tests import guide

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("guide_probe.py")
HISTORY = "tests/histories/ticket_triage_approved.json"
SHELL_TOOLS = {"python3", "pip", "stead", "cd", "make", "curl", "export"}

BLOCKS = guide.blocks()
SHELL = [words for b in BLOCKS if b.lang == "sh" for words in guide.commands(b)]


def tool(words: list[str]) -> str:
    """What a command runs: `~/.venvs/stead/bin/pip` is pip; `A=$(...)` is an assignment."""
    if re.fullmatch(r"[A-Z_]+=\$\(python3", words[0]):
        return "assign"
    return Path(words[0]).name


def exports() -> dict[str, str]:
    pairs = [w[1].split("=", 1) for w in SHELL if w[0] == "export"]
    return {name: value for name, value in pairs}


def curls() -> list[tuple[str, str, dict[str, Any] | None]]:
    """Each `curl` of the guide: method, path, JSON body."""
    found = []
    for words in SHELL:
        if words[0] != "curl":
            continue
        url = next(w for w in words if w.startswith("http://"))
        method = words[words.index("-X") + 1] if "-X" in words else "GET"
        body = json.loads(words[words.index("-d") + 1]) if "-d" in words else None
        found.append((method, "/" + url.split("/", 3)[3], body))
    return found


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The project the guide makes, with its edits; and a copy edited without the gate."""
    root = tmp_path_factory.mktemp("guide")
    project = guide.make_project(root / "reader")
    careless = root / "careless" / project.name
    shutil.copytree(project, careless)
    assert guide.apply_edits(project)
    guide.apply_edits(careless, gated=False)
    return project, careless


def probe(project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PROBE)],
        cwd=project,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def probed(
    projects: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the project's APP loads to, with the guide's policy snippets on
    STEAD_POLICY_PATH and its integration configuration; and the careless copy's."""
    snippets = tmp_path_factory.mktemp("policy-snippets")
    for block in BLOCKS:
        if block.claim == "policy":
            (snippets / Path(block.path).name).write_text(block.text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEAD_")}
    env = {**env, **exports(), "STEAD_POLICY_PATH": str(snippets)}
    inputs = [body for method, path, body in curls() if (method, path) == ("POST", "/v1/runs")]
    asked = {"inputs": inputs, "histories": [HISTORY]}
    running = [probe(p, env) for p in projects]
    results = []
    for process in running:
        out, err = process.communicate(json.dumps(asked), timeout=300)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))  # the core SDK logs to stdout too
    return results[0], results[1]


def test_every_block_makes_a_claim_the_tests_check() -> None:
    unclaimed = [b.where for b in BLOCKS if b.claim is None and b.lang != "sh"]
    assert not unclaimed, f"blocks no test checks: {unclaimed}"
    unknown = [" ".join(w) for w in SHELL if tool(w) not in SHELL_TOOLS | {"assign"}]
    assert not unknown, f"commands no test checks: {unknown}"
    assert {b.claim for b in BLOCKS} == {"from", "policy", "edit", None}
    assert "(docs/building.md)" in (ROOT / "README.md").read_text()  # a newcomer finds it


def test_the_excerpts_are_what_stead_new_writes(projects: tuple[Path, Path]) -> None:
    project, _ = projects
    for block in BLOCKS:
        if block.claim != "from":
            continue
        text = (project / block.path).read_text()
        at = 0
        for part in block.text.split(guide.ELIDED + "\n"):
            found = text.find(part.strip("\n"), at)
            assert found >= 0, f"{block.where}: not in {block.path}:\n{part}"
            at = found + len(part.strip("\n"))


def test_the_commands_are_real(projects: tuple[Path, Path], tmp_path: Path) -> None:
    project, _ = projects
    targets = set(re.findall(r"^([a-z-]+):", (project / "Makefile").read_text(), re.M))
    extras = metadata.metadata("stead").get_all("Provides-Extra") or []
    parser = build_parser()
    demo = {f"{t}/{u}": "k" for t in DEMO_TENANTS for u in DEMO_USERS}
    (tmp_path / ".stead").mkdir()
    (tmp_path / ".stead" / "dev.json").write_text(json.dumps({"keys": demo}))
    for words in SHELL:
        match tool(words):
            case "make":
                assert words[1] in targets, words
            case "stead":
                parser.parse_args(words[1:])  # exits (fails the test) on what the CLI refuses
            case "pip":
                assert words[1] == "install", words
                (requirement,) = words[2:]
                found = re.fullmatch(r"stead\[(\w+)\]", requirement)
                assert found, requirement
                assert found[1] in extras
            case "python3":
                assert words[1:3] == ["-m", "venv"], words
            case "assign":
                # `KEY=$(python3 -c "...")`: the one-liner reads the key of a demo user.
                assert words[1] == "-c", words
                assert words[2].endswith(")"), words
                done = subprocess.run(
                    [sys.executable, "-c", words[2][:-1]],
                    cwd=tmp_path,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert done.stdout == "k\n", done.stderr


def test_the_requests_reach_routes_that_take_them(probed: tuple[dict[str, Any], Any]) -> None:
    loaded, _ = probed
    served = [
        (m, re.compile(re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")) for m, path in loaded["routes"]
    ]
    for method, path, _body in curls():
        assert any(m == method and p.match(path) for m, p in served), (method, path)
    assert loaded["inputs"], "the guide starts no run"
    assert loaded["inputs"] == [None] * len(loaded["inputs"])  # the pipeline takes each input
    assert ("POST", "/v1/tickets") in {(m, p) for m, p in loaded["routes"]}


def test_the_integration_configuration_is_read(probed: tuple[dict[str, Any], Any]) -> None:
    loaded, _ = probed
    given = exports()
    assert given, "the guide configures no integration"
    billing = loaded["integrations"]["billing"]
    assert billing["url"] == given["STEAD_INTEGRATION_BILLING_URL"]
    assert billing["scopes"] == given["STEAD_INTEGRATION_BILLING_SCOPES"].split(",")


def test_the_policy_snippets_load_over_the_projects(probed: tuple[dict[str, Any], Any]) -> None:
    loaded, _ = probed
    for block in BLOCKS:
        if block.claim != "policy":
            continue
        snippet = yaml.safe_load(block.text)
        if Path(block.path).name == "permissions.yaml":
            for name, role in snippet["roles"].items():
                held = loaded["roles"][name]
                assert set(role.get("rights", [])) <= set(held["rights"])
                grants = [{k: v for k, v in g.items() if k != "rule"} for g in held["grants"]]
                for grant in role.get("grants", []):
                    assert grant in grants, (name, grant)
        else:
            for pipeline, steps in snippet.items():
                for step, rule in steps.items():
                    assert rule.items() <= loaded["approvals"][pipeline][step].items()


def test_the_edit_replays_and_without_its_gate_it_would_not(
    probed: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    loaded, careless = probed
    assert loaded["replays"] == {HISTORY: None}
    assert "Nondeterminism" in str(careless["replays"][HISTORY])
