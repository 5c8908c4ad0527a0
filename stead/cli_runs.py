"""`stead runs ...` and `stead approvals ...`: the API's runs and approvals from a terminal,
through `stead.client`.

stead runs start PIPELINE --input JSON|@FILE [--key K] [--budget-usd N] [--watch]
stead runs show RUN | watch RUN | list [--status S] [--pipeline P] | cancel RUN | retry RUN
stead approvals list | decide APPROVAL approve|reject [--comment C] [--edit FIELD=VALUE]

The API's URL is `--url` or STEAD_URL. The API key is STEAD_API_KEY or the file named by
`--api-key-file`, never a flag's value: a command line is visible to every user of the
machine. Errors are one line on stderr with the API's code (exit 1); a missing key exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the client imports the platform: only the commands that use it pay
    from stead.client import Client
    from stead.service.run_events import RunEvent

Command = Callable[[argparse.Namespace], int]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `runs` and `approvals` under the `stead` command's subcommands."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default=None, help="the API's URL (else STEAD_URL)")
    connection.add_argument(
        "--api-key-file", type=Path, default=None, help="a file holding the API key"
    )
    runs = sub.add_parser("runs", help="start, watch and manage runs through the API")
    cmds = runs.add_subparsers(dest="runs_command", required=True)
    start = _command(cmds, "start", "start a run", cmd_start, connection)
    start.add_argument("pipeline")
    start.add_argument("--input", required=True, help="the input as JSON, or @FILE")
    start.add_argument("--key", default=None, help="an idempotency key")
    start.add_argument("--budget-usd", type=float, default=None)
    start.add_argument("--watch", action="store_true", help="then watch its events")
    for name, help_text, func in (
        ("show", "a run's state, as JSON", cmd_show),
        ("watch", "a run's live events as they arrive", cmd_watch),
        ("cancel", "cancel a run", cmd_cancel),
    ):
        _command(cmds, name, help_text, func, connection).add_argument("run_id")
    retry = _command(cmds, "retry", "re-drive a failed run", cmd_retry, connection)
    retry.add_argument("run_id")
    retry.add_argument("--mode", choices=["resume", "restart"], default="resume")
    listing = _command(cmds, "list", "the tenant's runs, newest first", cmd_list, connection)
    listing.add_argument("--status", default=None)
    listing.add_argument("--pipeline", default=None)
    listing.add_argument("--limit", type=int, default=20)

    approvals = sub.add_parser("approvals", help="the approvals you may decide")
    acmds = approvals.add_subparsers(dest="approvals_command", required=True)
    _command(acmds, "list", "pending approvals you may decide", cmd_inbox, connection)
    decide = _command(acmds, "decide", "approve or reject", cmd_decide, connection)
    decide.add_argument("approval_id")
    decide.add_argument("decision", choices=["approve", "reject"])
    decide.add_argument("--comment", default="")
    decide.add_argument(
        "--edit", action="append", default=[], metavar="FIELD=VALUE", help="change a field"
    )


def _command(
    cmds: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    func: Command,
    parent: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    command = cmds.add_parser(name, help=help_text, parents=[parent])
    command.set_defaults(func=_guarded(func))
    return command


def _guarded(func: Command) -> Command:
    """The command, with the API's refusals as one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        from stead.client import SteadError, WaitTimeout  # noqa: PLC0415  # see TYPE_CHECKING

        try:
            return func(args)
        except (SteadError, WaitTimeout) as error:
            print(f"stead: {error}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as error:
            print(f"stead: {error}", file=sys.stderr)
            return 2

    return run


def _client(args: argparse.Namespace) -> Client:
    from stead.client import Client  # noqa: PLC0415  # see TYPE_CHECKING

    key = os.environ.get("STEAD_API_KEY")
    if args.api_key_file is not None:
        key = args.api_key_file.read_text().strip()
    if not key:
        raise ValueError("set STEAD_API_KEY, or pass --api-key-file")
    return Client(args.url or os.environ.get("STEAD_URL"), key)


def cmd_start(args: argparse.Namespace) -> int:
    text = args.input
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--input is not JSON: {exc}") from None
    with _client(args) as client:
        run = client.start(args.pipeline, body, key=args.key, budget_usd=args.budget_usd)
        print(run.run_id if run.created else f"{run.run_id} (existing run, same key)")
        if args.watch:
            render(client.events(run.run_id), sys.stdout)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.get(args.run_id).model_dump_json(indent=2))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        render(client.events(args.run_id), sys.stdout)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(f"{client.cancel(args.run_id).run_id} cancelling")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.retry(args.run_id, args.mode).run_id)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list(status=args.status, pipeline=args.pipeline, limit=args.limit)
    for run in page.items:
        stage = run.stage.value if run.stage else "-"
        print(f"{run.run_id}  {run.status.value:<9}  {stage:<14}  {run.pipeline}")
    return 0


def cmd_inbox(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.approvals()
    for approval in page.items:
        print(
            f"{approval.approval_id}  {approval.run_id}  {approval.kind:<10}  {approval.title}"
            f"  (due {approval.deadline_at:%Y-%m-%d %H:%M}Z)"
        )
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    edits = dict(_edit(e) for e in args.edit) or None
    with _client(args) as client:
        out = client.decide(args.approval_id, args.decision, comment=args.comment, edits=edits)
    print(f"{out.approval_id} {out.status.value} ({out.approvals}/{out.quorum})")
    return 0


def _edit(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--edit {text!r}: expected FIELD=VALUE")
    return name, value


def render(events: Iterable[RunEvent], out: TextIO) -> None:
    """Each event as a line when it arrives; streamed text as it is written."""
    streaming = False
    for event in events:
        if event.type == "model.tokens":
            if event.data.get("reset") and streaming:
                out.write("\n  [retried]\n")
            out.write(("  " if not streaming else "") + str(event.data.get("text", "")))
            streaming = True
        else:
            if streaming:
                out.write("\n")
                streaming = False
            out.write(f"{event.at:%H:%M:%S}  {event.type:<20} {describe(event)}\n")
        out.flush()


def describe(event: RunEvent) -> str:
    """The few facts of an event worth a line."""
    line = _LINES.get(event.type)
    return line(event.data, event.actor) if line is not None else ""


def _model_line(data: dict[str, Any], _: str) -> str:
    cache = " (cache hit)" if data.get("cache_hit") else ""
    tokens = f"{data.get('input_tokens')}+{data.get('output_tokens')} tokens"
    return f"{data.get('model')} {tokens} ${data.get('cost_usd') or 0:.6f}{cache}"


_LINES: dict[str, Callable[[dict[str, Any], str], str]] = {
    "stage.entered": lambda d, _: str(d.get("stage", "")),
    "model.called": _model_line,
    "tool.called": lambda d, _: f"{d.get('tool')} {d.get('status')} ({d.get('rule') or '-'})",
    "approval.requested": lambda d, _: f"{d.get('approval_id')} {d.get('title', '')}",
    "approval.decided": lambda d, who: f"{d.get('approval_id')} {d.get('status', '')} by {who}",
    "run.progress": lambda d, _: " ".join(f"{k}={v}" for k, v in d.items()),
    "run.completed": lambda d, _: json.dumps(d.get("output"), default=str)[:400],
    "run.failed": lambda d, _: f"{d.get('error_type')}: {d.get('message')}",
}
