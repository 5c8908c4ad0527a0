"""The `stead` command: run the platform's processes and administer it.

stead dev                      everything, locally (what `make dev` runs)
stead api | worker | sim | integrations     one process each
stead migrate                  apply schema migrations as the owner (STEAD_MIGRATE_DATABASE_URL)
stead audit verify [--tenant T]   recompute audit hash chains; non-zero exit on tampering
stead admin ...                tenants, users, keys, roles, grants, budgets
stead new app DIR | pipeline NAME | tool NAME   a new application, or a pipeline or tool in one
stead runs ... | approvals ... runs and approvals through the API (stead.cli_runs)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stead.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from stead.app import Runtime


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _checked(url: str, variable: str | None = None) -> str:
    """`url` if a connection to it works; else one line naming the problem, and exit 2."""
    from stead.dbcheck import database_problem  # noqa: PLC0415  # imports asyncpg

    # pydantic-settings reads STEAD_DATABASE_URL first: name the one the user set.
    if variable is None:
        variable = "STEAD_DATABASE_URL" if "STEAD_DATABASE_URL" in os.environ else "DATABASE_URL"
    problem = asyncio.run(database_problem(url, variable))
    if problem is not None:
        print(f"stead: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return url


def _required_database_url(settings: Settings, who: str) -> str:
    """The API and the worker take their database from the environment only."""
    if settings.database_url is None:
        print(f"stead: set DATABASE_URL (or STEAD_DATABASE_URL) for the {who}", file=sys.stderr)
        raise SystemExit(2)
    return _checked(settings.database_url.get_secret_value())


def _database_url(settings: Settings) -> str:
    if settings.database_url is not None:
        return _checked(settings.database_url.get_secret_value())
    from stead.store.embedded import EmbeddedPostgres  # noqa: PLC0415  # only needed without a URL

    pg = EmbeddedPostgres(settings.pg_dir.resolve())
    if not pg.initialized() or not pg.running():
        print(
            "stead: set DATABASE_URL, or start `stead dev` so the embedded PostgreSQL runs",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return pg.url()


def _with_app(args: argparse.Namespace) -> None:
    """`--app module:attr` is STEAD_APP for this process and every process it starts."""
    if getattr(args, "app", None):
        os.environ["STEAD_APP"] = args.app


def _runtime(settings: Settings) -> Runtime:
    """The application's registries, or one line saying why it does not load (exit 2)."""
    from stead.app import AppError  # noqa: PLC0415
    from stead.loader import PLATFORM_ONLY, load_app  # noqa: PLC0415

    try:
        app = load_app(settings.app)
        if app is PLATFORM_ONLY:
            print(
                "stead: no application (--app module:attr, STEAD_APP, or a 'stead.apps' entry"
                " point): running Stead's own pipelines only",
                file=sys.stderr,
            )
        return app.load(settings)
    except AppError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_dev(args: argparse.Namespace) -> int:
    _with_app(args)
    settings = _settings()
    from stead.dev import run_dev  # noqa: PLC0415

    return run_dev(settings, _runtime(settings))


def _serve(app: Any, host: str, port: int) -> int:
    import uvicorn  # noqa: PLC0415

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


def _serving(settings: Settings, process: str) -> Settings:
    try:
        settings.check_serving(process)
    except ConfigError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def cmd_api(args: argparse.Namespace) -> int:
    _with_app(args)
    settings = _settings()
    _required_database_url(settings, "API")
    _serving(settings, "API")
    runtime = _runtime(settings)
    from stead.api.app import create_app  # noqa: PLC0415

    return _serve(create_app(settings, runtime=runtime), settings.host, settings.api_port)


def cmd_worker(args: argparse.Namespace) -> int:
    _with_app(args)
    # worker.main() reads the settings again; checked here, a bad one is a line, not a trace.
    settings = _settings()
    _required_database_url(settings, "worker")
    _serving(settings, "worker")
    _runtime(settings)
    from stead import worker  # noqa: PLC0415

    worker.main()
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from stead.sim.messages import SimConfig, create_app  # noqa: PLC0415

    settings = _settings()
    return _serve(
        create_app(SimConfig(latency_ms=args.latency_ms)), settings.host, settings.sim_port
    )


def cmd_dev_integrations(_: argparse.Namespace) -> int:
    """Serve loopback stand-ins of the application's integrations (what `stead dev` runs as
    one child): STEAD_DEV_INTEGRATIONS=`name:port,...`, or, unset, every unconfigured one
    with a `dev_app`, the n-th on STEAD_DEV_INTEGRATIONS_PORT + n."""
    from stead.dev import dev_integrations  # noqa: PLC0415
    from stead.sim.integrations import serve_apps  # noqa: PLC0415

    settings = _settings()
    if settings.dev_integrations_token is None:
        print("stead: set STEAD_DEV_INTEGRATIONS_TOKEN", file=sys.stderr)
        return 2
    token = settings.dev_integrations_token.get_secret_value()
    runtime = _runtime(settings)
    named = settings.dev_integrations
    if named:
        pairs = [item.rsplit(":", 1) for item in named.split(",") if item]
        wanted = [(runtime.integrations[name], int(port)) for name, port in pairs]
    else:
        wanted = dev_integrations(runtime, settings)
    state = settings.data_dir / "integrations"
    state.mkdir(parents=True, exist_ok=True)
    apps = [
        (integration.name, integration.dev_app(token, state / f"{integration.name}.jsonl"), port)
        for integration, port in wanted
        if integration.dev_app is not None
    ]
    serve_apps(settings.host, apps)
    return 0


def _app_migrations(settings: Settings) -> tuple[str, Path] | None:
    from stead.app import AppError  # noqa: PLC0415
    from stead.loader import load_app  # noqa: PLC0415

    try:
        app = load_app(settings.app)
    except AppError as exc:
        if settings.app:
            print(f"stead: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        return None  # no application named or installed: Stead's own tables only
    return (app.name, app.migrations) if app.migrations is not None else None


def _run(coro: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command on the database; what PostgreSQL refuses ends in one line, exit 1."""
    import asyncpg  # noqa: PLC0415

    try:
        return asyncio.run(coro())
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        print(f"stead: PostgreSQL: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
    return 1


def _owner_database_url(settings: Settings) -> str:
    """The owner's URL for migrations and gc: STEAD_MIGRATE_DATABASE_URL, else DATABASE_URL,
    else the embedded server's superuser."""
    if settings.migrate_database_url is not None:
        url = settings.migrate_database_url.get_secret_value()
        return _checked(url, "STEAD_MIGRATE_DATABASE_URL")
    return _database_url(settings)


def cmd_migrate(args: argparse.Namespace) -> int:
    from stead.store.migrate import migrate  # noqa: PLC0415

    _with_app(args)
    settings = _settings()
    url = _owner_database_url(settings)
    app_url = settings.database_url.get_secret_value() if settings.database_url else None
    # The application's own tables too, when there is one to load.
    application = _app_migrations(settings)

    async def go() -> int:
        applied = await migrate(
            url, app_url=app_url, app_role=settings.db_app_role, application=application
        )
        print(
            f"applied {len(applied)} migration(s): {applied}" if applied else "schema is up to date"
        )
        return 0

    return _run(go)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 if every chain checked is intact, 1 if one is broken, 2 for an unknown tenant."""
    import asyncpg  # noqa: PLC0415

    from stead.store.audit import verify  # noqa: PLC0415

    url = _database_url(_settings())

    async def go() -> int:
        conn = await asyncpg.connect(url)
        try:
            # Tenants without entries are listed too: an emptied log shows as 0 entries.
            known = {
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM tenants UNION SELECT DISTINCT tenant_id FROM audit_log"
                )
            }
            if args.tenant is not None and args.tenant not in known:
                print(f"stead: no tenant {args.tenant!r}", file=sys.stderr)
                return 2
            broken = 0
            for tenant in [args.tenant] if args.tenant is not None else sorted(known):
                result = await verify(conn, tenant)
                if result.ok:
                    head = f", head {result.head_seq} {result.head_hash}" if result.entries else ""
                    print(f"{tenant}: ok ({result.entries} entries{head})")
                else:
                    broken += 1
                    print(
                        f"{tenant}: BROKEN at seq {result.first_bad_seq}: {result.problem}"
                        f" ({result.detail})"
                    )
            return 1 if broken else 0
        finally:
            await conn.close()

    return _run(go)


def cmd_admin(args: argparse.Namespace) -> int:
    """Platform administration straight on the database (the operator's own credentials)."""
    import asyncpg  # noqa: PLC0415

    from stead.policy.permissions import PLATFORM_TENANT, load_policy  # noqa: PLC0415
    from stead.store import budgets, principals  # noqa: PLC0415

    url = _database_url(_settings())
    platform_roles = load_policy().platform_roles

    async def go() -> int:
        conn = await asyncpg.connect(url)
        try:
            match args.admin_command:
                case "tenant-create":
                    if args.tenant == PLATFORM_TENANT:
                        print(f"stead: tenant id {PLATFORM_TENANT!r} is reserved", file=sys.stderr)
                        return 2
                    await principals.create_tenant(
                        conn, args.tenant, args.name or args.tenant, args.plan
                    )
                    print(f"tenant {args.tenant} ready")
                case "user-create":
                    roles = [r for r in args.roles.split(",") if r]
                    if set(roles) & platform_roles:
                        print(
                            "stead: platform roles are held only by operators: use"
                            " `stead admin operator-create`",
                            file=sys.stderr,
                        )
                        return 2
                    await principals.upsert_principal(conn, args.tenant, args.user, roles)
                    print(f"user {args.tenant}/{args.user} roles={roles}")
                case "operator-create":
                    # Operators belong to no customer tenant: their rights reach every tenant.
                    await principals.create_tenant(conn, PLATFORM_TENANT, "Platform", "platform")
                    await principals.upsert_principal(
                        conn, PLATFORM_TENANT, args.user, sorted(platform_roles)
                    )
                    print(await principals.create_key(conn, PLATFORM_TENANT, args.user, "operator"))
                case "key-create":
                    key = await principals.create_key(conn, args.tenant, args.user, args.label)
                    print(key)  # shown once
                case "key-revoke":
                    if not await principals.revoke_key(conn, args.tenant, args.key_id):
                        print("no such active key", file=sys.stderr)
                        return 1
                    print("revoked")
                case "budget-set":
                    await budgets.set_budget(
                        conn, args.tenant, args.scope, args.subject, args.period, args.limit_usd
                    )
                    print("budget set")
            return 0
        except asyncpg.ForeignKeyViolationError:
            print(f"stead: {_missing(args)}", file=sys.stderr)
            return 1
        finally:
            await conn.close()

    return _run(go)


def _missing(args: argparse.Namespace) -> str:
    """What a foreign key refused: the user of a new key, or the tenant of a new user."""
    if args.admin_command == "key-create":
        return (
            f"no user {args.user!r} in tenant {args.tenant!r}; create it with"
            f" `stead admin user-create {args.tenant} {args.user} --roles ...`"
        )
    return f"no tenant {args.tenant!r}; create it with `stead admin tenant-create {args.tenant}`"


def cmd_payloads_gc(args: argparse.Namespace) -> int:
    """Exit 0 after collecting, 2 when gc refuses (a nonsense or unsafe age, or a history it
    cannot read) or cannot reach Temporal or PostgreSQL: nothing is deleted then."""
    import asyncpg  # noqa: PLC0415
    from temporalio.service import RPCError  # noqa: PLC0415

    from stead.payload_gc import GcRefused, collect_unreferenced  # noqa: PLC0415
    from stead.temporal import connect  # noqa: PLC0415

    settings = _settings()
    url = _owner_database_url(settings)  # only the owner may delete stored payloads

    async def go() -> int:
        try:
            client = await connect(settings)
            conn = await asyncpg.connect(url)
            try:
                result = await collect_unreferenced(client, conn, args.older_than_days)
            finally:
                await conn.close()
        except GcRefused as exc:
            print(f"stead: payloads gc: {exc}", file=sys.stderr)
            return 2
        except (OSError, RuntimeError, RPCError, asyncpg.PostgresError) as exc:
            print(f"stead: payloads gc: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print(
            f"removed {result.removed} stored payload(s) older than {args.older_than_days} days;"
            f" kept {result.kept} that {result.histories} open or retained histories reference;"
            f" removed {result.messages_removed} stored conversation message(s) of workflows"
            " none of whose histories is kept"
        )
        return 0

    return _run(go)


def cmd_new(args: argparse.Namespace) -> int:
    """Write a project, or a pipeline or tool into the one in --dir; say what was done."""
    from stead import scaffold  # noqa: PLC0415  # keeps `stead --help` fast

    root = Path(args.dir)
    try:
        match args.new_command:
            case "app":
                root = Path(args.target)
                report = scaffold.new_app(root, args.name)
            case "pipeline":
                report = scaffold.new_pipeline(root, args.name, args.tool)
            case _:
                report = scaffold.new_tool(
                    root, args.name, args.integration, args.resource, args.action
                )
    except scaffold.ScaffoldError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines(root)))
    return 0


def _new_parser(sub: Any) -> None:
    new = sub.add_parser("new", help="a new application, or a pipeline or tool in one")
    new.set_defaults(func=cmd_new)
    cmds = new.add_subparsers(dest="new_command", required=True)
    app = cmds.add_parser("app", help="a new project: an example pipeline, tool and tests")
    app.add_argument("target", help="the project's directory (new, or empty)")
    app.add_argument("--name", default=None, help="the project's name (default: the directory's)")
    app.set_defaults(dir=".")
    pipeline = cmds.add_parser("pipeline", help="a pipeline with a model step and a review")
    pipeline.add_argument("name", help="kebab-case, e.g. refund-request")
    pipeline.add_argument("--tool", default=None, help="a tool of the project it calls")
    tool = cmds.add_parser("tool", help="a tool on an HTTP integration")
    tool.add_argument("name", help="snake_case, e.g. issue_credit")
    tool.add_argument("--integration", required=True, help="e.g. billing (new or existing)")
    tool.add_argument("--resource", default=None, help="what grants name (default: last word)")
    tool.add_argument("--action", default="execute", choices=["read", "draft", "execute"])
    for command in (pipeline, tool):
        command.add_argument("--dir", default=".", help="the project (default: here)")


def _admin_parser(sub: Any) -> None:
    admin = sub.add_parser("admin", help="tenants, users, keys, budgets (platform operator)")
    admin.set_defaults(func=cmd_admin)
    cmds = admin.add_subparsers(dest="admin_command", required=True)
    tenant = cmds.add_parser("tenant-create", help="create or update a tenant")
    tenant.add_argument("tenant")
    tenant.add_argument("--name", default="")
    tenant.add_argument("--plan", default="standard")
    user = cmds.add_parser("user-create", help="create a user or set their roles")
    user.add_argument("tenant")
    user.add_argument("user")
    user.add_argument("--roles", default="", help="comma-separated, e.g. requester,approver")
    operator = cmds.add_parser(
        "operator-create", help="create a platform operator (codec access) and print its key"
    )
    operator.add_argument("user")
    key = cmds.add_parser("key-create", help="create an API key (printed once)")
    key.add_argument("tenant")
    key.add_argument("user")
    key.add_argument("--label", default="")
    revoke = cmds.add_parser("key-revoke", help="revoke an API key by its id")
    revoke.add_argument("tenant")
    revoke.add_argument("key_id")
    budget = cmds.add_parser("budget-set", help="set a customer or user budget")
    budget.add_argument("tenant")
    budget.add_argument("--scope", choices=["customer", "user"], default="customer")
    budget.add_argument("--subject", default="")
    budget.add_argument("--period", choices=["day", "month"], default="month")
    budget.add_argument("--limit-usd", type=float, required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stead", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, func in (
        ("dev", "run the whole platform locally", cmd_dev),
        ("api", "run the HTTP API", cmd_api),
        ("worker", "run a worker", cmd_worker),
        ("migrate", "apply schema migrations (Stead's, then the application's)", cmd_migrate),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument(
            "--app", default=None, help="the application, module:attr (else STEAD_APP)"
        )
        command.set_defaults(func=func)
    sim = sub.add_parser("sim", help="run the local Messages-API simulator")
    sim.add_argument("--latency-ms", type=float, default=0.0)
    sim.set_defaults(func=cmd_sim)
    sub.add_parser(
        "dev-integrations", help="serve the loopback stand-ins of unconfigured integrations"
    ).set_defaults(func=cmd_dev_integrations)
    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="recompute hash chains")
    verify.add_argument("--tenant", default=None)
    verify.set_defaults(func=cmd_audit_verify)
    _admin_parser(sub)
    _new_parser(sub)
    payloads = sub.add_parser("payloads", help="the claim-check store of large payloads")
    payloads_sub = payloads.add_subparsers(dest="payloads_command", required=True)
    gc = payloads_sub.add_parser(
        "gc",
        help="delete stored payloads older than the namespace retention plus a day that no"
        " open or retained history references",
    )
    gc.add_argument("--older-than-days", type=int, required=True)
    gc.set_defaults(func=cmd_payloads_gc)
    from stead.cli_runs import add_parsers  # noqa: PLC0415  # the API client's commands

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
