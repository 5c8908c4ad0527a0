"""`stead new`: what the generators write and wire, and what they refuse. The generated
project's own `make test` and `make dev` are driven in tests/test_new_app.py."""

from __future__ import annotations

import ast
import json
import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from stead import scaffold
from stead.cli import main

LAYOUT = {
    "pyproject.toml",
    "README.md",
    "Makefile",
    "docker-compose.yml",
    "worker.py",
    "deploy/README.md",
    "workflows/ticket_triage.py",
    "activities/open_case.py",
    "activities/helpdesk.py",
    "api/tickets.py",
    "policies/permissions.yaml",
    "policies/approvals.yaml",
    "tests/conftest.py",
    "tests/test_ticket_triage.py",
    "tests/test_replay.py",
    "tests/histories/ticket_triage_approved.json",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "acme-desk"
    scaffold.new_app(root)
    return root


def test_a_new_app_has_the_design_cards_layout(project: Path) -> None:
    written = {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}
    assert written >= LAYOUT
    for path in project.rglob("*.py"):
        ast.parse(path.read_text(), str(path))  # every template rendered to Python
        leftover = re.findall(r"__[A-Za-z_]+__", path.read_text())
        assert set(leftover) <= {"__future__", "__file__"}, path  # no token left unrendered
    assert 'APP = stead.App(\n    "acme-desk"' in (project / "worker.py").read_text()
    history = json.loads((project / "tests/histories/ticket_triage_approved.json").read_text())
    started = history["events"][0]["workflowExecutionStartedEventAttributes"]
    assert started["workflowType"]["name"] == "ticket-triage"


def test_the_project_depends_on_the_stead_it_was_made_with(project: Path) -> None:
    pyproject = (project / "pyproject.toml").read_text()
    origin = json.loads(metadata.distribution("stead").read_text("direct_url.json") or "{}")
    # This checkout is installed editable: the project installs Stead from the same path.
    assert origin["url"].startswith("file://")
    assert f'dependencies = ["stead @ {origin["url"]}"]' in pyproject
    assert f'"stead[testing] @ {origin["url"]}"' in pyproject


def test_a_new_tool_and_pipeline_are_wired(project: Path) -> None:
    tool = scaffold.new_tool(project, "issue_credit", "billing")
    pipeline = scaffold.new_pipeline(project, "credit-request", tool="issue_credit")
    assert len(tool.todo) == 1  # how to offer it to a pipeline
    assert not pipeline.todo
    worker = (project / "worker.py").read_text()
    assert "from workflows.credit_request import CreditRequest\n" in worker
    assert "        CreditRequest,\n" in worker
    permissions = yaml.safe_load((project / "policies/permissions.yaml").read_text())
    grant = {
        "action": "execute",
        "resource": "credit",
        "constraints": [{"field": "customer_id", "fact": "customer_id"}],
    }
    assert grant in permissions["roles"]["requester"]["grants"]
    assert permissions["agents"]["credit-request"]["grants"] == [grant]
    approvals = yaml.safe_load((project / "policies/approvals.yaml").read_text())
    assert approvals["credit-request"]["review"]["roles"] == ["approver", "admin"]
    module = (project / "workflows/credit_request.py").read_text()
    assert "tools=(issue_credit,)" in module
    assert 'scopes=("billing:write",)' in (project / "activities/issue_credit.py").read_text()


def test_a_pipeline_without_a_tool_has_no_tool_step(project: Path) -> None:
    scaffold.new_pipeline(project, "plain-note")
    module = (project / "workflows/plain_note.py").read_text()
    assert "call_tool" not in module
    assert "stages=(Stage.MODEL_CALL, Stage.REVIEW)," in module
    assert "record_id" not in (project / "workflows/plain_note_models.py").read_text()


def test_a_worker_py_of_another_shape_gets_a_to_do(project: Path) -> None:
    worker = project / "worker.py"
    worker.write_text(worker.read_text().replace("pipelines=[\n", "pipelines=[  # ours\n"))
    report = scaffold.new_pipeline(project, "plain-note")
    assert report.todo == [
        "worker.py: `from workflows.plain_note import PlainNote` and add PlainNote to APP's"
        " pipelines"
    ]
    assert "PlainNote" not in worker.read_text()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["pipeline", "Refund_Request"], "pipeline name 'Refund_Request'"),
        (["pipeline", "ticket-triage"], "already has a pipeline 'ticket-triage'"),
        (["pipeline", "credit", "--tool", "nope"], "no tool 'nope'"),
        (["tool", "open_case", "--integration", "helpdesk"], "open_case.py already exists"),
        (["tool", "issue-credit", "--integration", "billing"], "tool name 'issue-credit'"),
    ],
)
def test_refusals_are_one_line(
    project: Path, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["new", *argv, "--dir", str(project)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert says in err
    assert err.count("\n") == 1


def test_new_app_refuses_a_directory_in_use(project: Path) -> None:
    with pytest.raises(scaffold.ScaffoldError, match="not empty"):
        scaffold.new_app(project)


def test_outside_a_project_it_says_so(tmp_path: Path) -> None:
    with pytest.raises(scaffold.ScaffoldError, match="not a Stead project"):
        scaffold.new_pipeline(tmp_path, "credit-request")
