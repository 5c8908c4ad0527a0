"""`stead new`: an application's project, and the pipelines and tools added to it.

    stead new app DIR                                  a project with one example of everything
    stead new tool NAME --integration INTEGRATION      a tool on an HTTP integration (new or not)
    stead new pipeline NAME [--tool TOOL]              a pipeline with a structured model step and
                                                       a review, that calls TOOL once approved

The templates are package data (`stead/scaffold/templates/`, `*.tmpl`): files whose names and
text carry `__token__`s, and `# {tool` ... `# tool}` (or `# {no tool` ...) blocks kept only
when the pipeline has (or has not) a tool. What a template adds to files a project already
has (worker.py, the policy files) is wired in place and checked, or, where the file no longer
has the shape that was generated, said in the report instead.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

TEMPLATES = Path(__file__).parent / "templates"
_PIPELINE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_TOOL = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_PROJECT = re.compile(r"^[a-z][a-z0-9]*([-_][a-z0-9]+)*$")
_LONGEST = 30  # names appear in generated lines that must stay within the line length
_EXAMPLE = {"tool": "open_case", "integration": "helpdesk", "resource": "case"}


class ScaffoldError(Exception):
    """What cannot be generated, in one line."""


@dataclass
class Report:
    """What a command wrote, what it wired into existing files, and what is left to do."""

    written: list[Path] = field(default_factory=list)
    wired: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.written += other.written
        self.wired += other.wired
        self.todo += other.todo

    def lines(self, root: Path) -> list[str]:
        out = [f"wrote {p.relative_to(root)}" for p in self.written]
        out += [f"wired {w}" for w in self.wired]
        out += [f"to do: {t}" for t in self.todo]
        return out


# --- the Stead a project depends on ------------------------------------------------------------


def stead_requirement(extras: str = "") -> str:
    """How a generated project depends on this Stead: from the same path, wheel or
    repository it was installed from (its `direct_url.json`), else `stead>=<version>`."""
    dist = metadata.distribution("stead")
    name = f"stead[{extras}]" if extras else "stead"
    direct = dist.read_text("direct_url.json")
    if direct:
        origin = json.loads(direct)
        vcs = origin.get("vcs_info")
        if vcs:
            return f"{name} @ {vcs['vcs']}+{origin['url']}@{vcs['commit_id']}"
        if str(origin.get("url", "")).startswith("file://"):
            return f"{name} @ {origin['url']}"
    return f"{name}>={dist.version}"


# --- rendering ---------------------------------------------------------------------------------


def _blocks(text: str, keep: Mapping[str, bool]) -> str:
    """Drop the `# {name` ... `# name}` blocks whose condition is false, and the markers."""
    out: list[str] = []
    dropping: list[bool] = []
    for line in text.splitlines(keepends=True):
        marker = line.strip()
        if marker.startswith("# {") and marker[3:] in keep:
            dropping.append(not keep[marker[3:]])
            continue
        if marker.startswith("# ") and marker.endswith("}") and marker[2:-1] in keep:
            dropping.pop()
            continue
        if not any(dropping):
            out.append(line)
    return "".join(out)


def _render(text: str, tokens: Mapping[str, str]) -> str:
    for token in sorted(tokens, key=len, reverse=True):
        text = text.replace(token, tokens[token])
    return text


def _target(template: Path, kind: str, tokens: Mapping[str, str]) -> Path:
    relative = _render(str(template.relative_to(TEMPLATES / kind)), tokens)
    relative = relative.removesuffix(".tmpl")
    parts = Path(relative).parts
    # Dotfiles are kept out of the package's own tree (a .gitignore there would apply to it).
    name = parts[-1].replace("dot-", ".", 1) if parts[-1].startswith("dot-") else parts[-1]
    return Path(*parts[:-1], name)


def _write_templates(
    kind: str, root: Path, tokens: Mapping[str, str], keep: Mapping[str, bool]
) -> list[Path]:
    planned: list[tuple[Path, str]] = []
    for template in sorted(p for p in (TEMPLATES / kind).rglob("*") if p.is_file()):
        path = root / _target(template, kind, tokens)
        if path.exists():
            raise ScaffoldError(f"{path} already exists: not overwriting it")
        if template.suffix == ".tmpl":
            planned.append((path, _render(_blocks(template.read_text(), keep), tokens)))
        else:
            planned.append((path, template.read_text()))
    for path, text in planned:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [path for path, _ in planned]


# --- names -------------------------------------------------------------------------------------


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[-_]", name))


def _check(name: str, pattern: re.Pattern[str], what: str, example: str) -> None:
    if not pattern.fullmatch(name) or len(name) > _LONGEST:
        raise ScaffoldError(
            f"{what} name {name!r}: lowercase letters and digits joined by"
            f" {'-' if '-' in example else '_'}, at most {_LONGEST} characters (e.g. {example})"
        )


def _project_root(root: Path) -> Path:
    if not (root / "worker.py").is_file() or not (root / "policies").is_dir():
        raise ScaffoldError(
            f"{root} is not a Stead project (no worker.py and policies/): run it in one made"
            " by `stead new app`"
        )
    return root


# --- wiring into files the project has ---------------------------------------------------------


def _module_of(line: str) -> str:
    return line.split()[1]


def _wire_pipeline(worker: Path, module: str, cls: str) -> bool:
    """Import `cls` and add it to `APP`'s `pipelines=[...]`; False when worker.py no longer
    has the generated shape (an exploded `pipelines=[` list, first-party imports)."""
    lines = worker.read_text().splitlines(keepends=True)
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "pipelines=[")
        end = next(i for i in range(start, len(lines)) if lines[i].strip() == "],")
    except StopIteration:
        return False
    lines.insert(end, f"        {cls},\n")
    ours = ("from activities", "from api", "from workflows")
    first = [i for i, ln in enumerate(lines) if ln.startswith(ours)]
    if not first or first != list(range(first[0], first[-1] + 1)):
        return False
    group = [lines[i] for i in first] + [f"from workflows.{module} import {cls}\n"]
    lines[first[0] : first[-1] + 1] = sorted(group, key=_module_of)
    worker.write_text("".join(lines))
    return True


def _append_yaml(path: Path, text: str, check: Any) -> bool:
    """Append `text` to the YAML file at `path` if the result parses and `check(loaded)`
    holds; else leave the file alone and return False."""
    old = path.read_text() if path.exists() else ""
    new = old.rstrip("\n") + "\n\n" + text if old.strip() else text
    try:
        loaded = yaml.safe_load(new) or {}
    except yaml.YAMLError:
        return False
    if not check(loaded):
        return False
    path.write_text(new)
    return True


def _add_grant(path: Path, section: str, subject: str, grant: str) -> bool:
    """Add `grant` (one YAML flow mapping) under `section: subject: grants:` in a
    permissions file of the generated shape; whether it worked (checked by parsing)."""
    lines = path.read_text().splitlines(keepends=True)
    top = [i for i, ln in enumerate(lines) if re.match(r"^\S", ln) and not ln.startswith("#")]
    try:
        at = next(i for i in top if lines[i].rstrip() == f"{section}:")
    except StopIteration:
        return False
    end = next((i for i in top if i > at), len(lines))
    entry = f"      - {grant}\n"
    own = next((i for i in range(at, end) if lines[i].rstrip() == f"  {subject}:"), None)
    if own is None:
        while end > at + 1 and not lines[end - 1].strip():
            end -= 1
        lines[end:end] = [f"  {subject}:\n", "    grants:\n", entry]
    else:
        grants = own + 1
        if grants >= end or lines[grants].rstrip() != "    grants:":
            return False
        last = grants
        while last + 1 < end and lines[last + 1].startswith("      "):
            last += 1
        lines.insert(last + 1, entry)
    text = "".join(lines)
    try:
        loaded = yaml.safe_load(text) or {}
        wanted = yaml.safe_load(grant)
        held = loaded[section][subject]["grants"]
    except (yaml.YAMLError, KeyError, TypeError):
        return False
    if wanted not in held:
        return False
    path.write_text(text)
    return True


def _grant(action: str, resource: str) -> str:
    return (
        f"{{action: {action}, resource: {resource},"
        " constraints: [{field: customer_id, fact: customer_id}]}"
    )


# --- the commands ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ToolInfo:
    name: str
    action: str
    resource: str


def _load_tool(root: Path, name: str) -> _ToolInfo:
    """The action and resource of the project's tool `name`, read from the `@stead.tool(...)`
    of `activities/<name>.py` (read, not imported: the project is not this process's)."""
    path = root / "activities" / f"{name}.py"
    if not path.is_file():
        raise ScaffoldError(
            f"no tool {name!r} in {root / 'activities'}: make it first with"
            f" `stead new tool {name} --integration <name>`"
        )
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError as exc:
        raise ScaffoldError(f"activities/{name}.py: {exc}") from None
    for node in tree.body:
        if isinstance(node, ast.AsyncFunctionDef) and node.name == name:
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call):
                    found = {
                        k.arg: k.value.value
                        for k in decorator.keywords
                        if isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)
                    }
                    if "action" in found and "resource" in found:
                        return _ToolInfo(name, found["action"], found["resource"])
    raise ScaffoldError(
        f"activities/{name}.py has no `@stead.tool(action=..., resource=...)` on {name}()"
    )


def new_pipeline(root: Path, name: str, tool: str | None = None) -> Report:
    """Add pipeline `name` (kebab-case) to the project at `root`, calling `tool` once a
    person approved the model's draft."""
    _check(name, _PIPELINE, "pipeline", "refund-request")
    root = _project_root(root)
    module, cls = name.replace("-", "_"), _camel(name)
    approvals = root / "policies" / "approvals.yaml"
    declared = yaml.safe_load(approvals.read_text()) if approvals.exists() else None
    if name in (declared or {}):
        raise ScaffoldError(f"policies/approvals.yaml already has a pipeline {name!r}")
    info = _load_tool(root, tool) if tool else None
    tokens = {
        "__pipeline__": name,
        "__module__": module,
        "__Class__": cls,
        "__tool__": tool or "",
    }
    keep = {"tool": bool(tool), "no tool": not tool}
    report = Report(written=_write_templates("pipeline", root, tokens, keep))
    if _wire_pipeline(root / "worker.py", module, cls):
        report.wired.append(f"worker.py: {cls} in APP's pipelines")
    else:
        report.todo.append(
            f"worker.py: `from workflows.{module} import {cls}` and add {cls} to APP's pipelines"
        )
    review = (
        f"{name}:\n"
        "  review: {roles: [approver, admin], timeout_seconds: 86400, on_deadline: escalate}\n"
    )
    if _append_yaml(approvals, review, lambda y: name in y):
        report.wired.append(f"policies/approvals.yaml: who reviews {name} (approver, admin)")
    else:
        report.todo.append(f"policies/approvals.yaml: add\n{review}")
    if info is not None:
        grant = _grant(info.action, info.resource)
        if _add_grant(root / "policies" / "permissions.yaml", "agents", name, grant):
            report.wired.append(
                f"policies/permissions.yaml: {name} may {info.action} {info.resource}"
            )
        else:
            report.todo.append(f"policies/permissions.yaml: under agents: {name}: grants: {grant}")
    return report


def new_tool(
    root: Path, name: str, integration: str, resource: str | None = None, action: str = "execute"
) -> Report:
    """Add tool `name` (snake_case) to the project at `root`, acting through HTTP
    integration `integration` (declared here when the project does not have it yet)."""
    _check(name, _TOOL, "tool", "issue_credit")
    _check(integration, _PIPELINE, "integration", "billing")
    if action not in ("read", "draft", "execute"):
        raise ScaffoldError(f"action {action!r}: read, draft or execute")
    resource = resource or name.rsplit("_", maxsplit=1)[-1]
    _check(resource, _TOOL, "resource", "credit")
    root = _project_root(root)
    module = integration.replace("-", "_")
    tokens = {
        "__tool__": name,
        "__Tool__": _camel(name),
        "__action__": action,
        "__resource__": resource,
        "__collection__": resource if resource.endswith("s") else f"{resource}s",
        "__integration__": integration,
        "__integration_module__": module,
        "__integration_var__": module,
        "__INTEGRATION_ENV__": module.upper(),
    }
    report = Report()
    tool_file = root / "activities" / f"{name}.py"
    if tool_file.exists():
        raise ScaffoldError(f"{tool_file} already exists: not overwriting it")
    if not (root / "activities" / f"{module}.py").exists():
        report.written += _write_templates("integration", root, tokens, {})
    report.written += _write_templates("tool", root, tokens, {})
    grant = _grant(action, resource)
    if _add_grant(root / "policies" / "permissions.yaml", "roles", "requester", grant):
        report.wired.append(f"policies/permissions.yaml: a requester may {action} {resource}")
    else:
        report.todo.append(f"policies/permissions.yaml: under roles: requester: grants: {grant}")
    report.todo.append(
        f"offer it to a pipeline: `stead new pipeline <name> --tool {name}`, or add"
        f" tools=({name},) to one and grant that pipeline {action} on {resource}"
        " (policies/permissions.yaml, agents:)"
    )
    return report


def new_app(target: Path, name: str | None = None) -> Report:
    """A new project in `target` (which must not exist, or be empty): the design card's
    layout with one example pipeline, tool, integration, policies, tests and history."""
    project = name or target.resolve().name
    if not _PROJECT.fullmatch(project) or len(project) > 64:
        raise ScaffoldError(
            f"project name {project!r}: lowercase letters and digits joined by - or _"
            " (name the directory so, or pass --name)"
        )
    if target.exists() and any(target.iterdir()):
        raise ScaffoldError(f"{target} exists and is not empty")
    tokens = {
        "__project__": project,
        "__app__": project,
        "__stead__": stead_requirement(),
        "__stead_testing__": stead_requirement("testing"),
    }
    target.mkdir(parents=True, exist_ok=True)
    report = Report(written=_write_templates("app", target, tokens, {}))
    example = new_tool(target, _EXAMPLE["tool"], _EXAMPLE["integration"], _EXAMPLE["resource"])
    report.extend(Report(written=example.written, wired=example.wired))
    report.extend(new_pipeline(target, "ticket-triage", tool=_EXAMPLE["tool"]))
    return report
