"""The `stead` command: run the platform's processes and administer it.

stead dev                      everything, locally (what `make dev` runs)
stead api | worker | sim | integrations     one process each
stead migrate                  apply schema migrations to DATABASE_URL
stead audit verify [--tenant T]   recompute audit hash chains; non-zero exit on tampering
stead admin ...                tenants, users, keys, roles, grants, budgets
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from stead.config import ConfigError, Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _database_url(settings: Settings) -> str:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from store.embedded import EmbeddedPostgres  # noqa: PLC0415  # only needed without a URL

    pg = EmbeddedPostgres(settings.pg_dir.resolve())
    if not pg.initialized() or not pg.running():
        print(
            "stead: set DATABASE_URL, or start `stead dev` so the embedded PostgreSQL runs",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return pg.url()


def cmd_dev(_: argparse.Namespace) -> int:
    from stead.dev import run_dev  # noqa: PLC0415

    return run_dev(_settings())


def _serve(app: Any, host: str, port: int) -> int:
    import uvicorn  # noqa: PLC0415

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


def cmd_api(_: argparse.Namespace) -> int:
    from api.app import create_app  # noqa: PLC0415

    settings = _settings()
    return _serve(create_app(settings), settings.host, settings.api_port)


def cmd_worker(_: argparse.Namespace) -> int:
    import worker  # noqa: PLC0415

    worker.main()
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from sim.messages import SimConfig, create_app  # noqa: PLC0415

    settings = _settings()
    return _serve(
        create_app(SimConfig(latency_ms=args.latency_ms)), settings.host, settings.sim_port
    )


def cmd_integrations(args: argparse.Namespace) -> int:
    from sim.integrations import run_integrations  # noqa: PLC0415

    settings = _settings()
    token = args.token or (
        settings.payments_token.get_secret_value() if settings.payments_token else None
    )
    if not token:
        print("stead: pass --token or set STEAD_PAYMENTS_TOKEN", file=sys.stderr)
        return 2
    run_integrations(
        settings.host,
        settings.payments_port,
        settings.email_port,
        token,
        settings.data_dir / "integrations",
    )
    return 0


def _run(coro: Callable[[], Coroutine[Any, Any, int]]) -> int:
    return asyncio.run(coro())


def cmd_migrate(_: argparse.Namespace) -> int:
    from store.migrate import migrate  # noqa: PLC0415

    url = _database_url(_settings())

    async def go() -> int:
        applied = await migrate(url)
        print(
            f"applied {len(applied)} migration(s): {applied}" if applied else "schema is up to date"
        )
        return 0

    return _run(go)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    import asyncpg  # noqa: PLC0415

    from store.audit import verify  # noqa: PLC0415

    url = _database_url(_settings())

    async def go() -> int:
        conn = await asyncpg.connect(url)
        try:
            tenants = (
                [args.tenant]
                if args.tenant
                else [
                    r["tenant_id"]
                    for r in await conn.fetch("SELECT DISTINCT tenant_id FROM audit_log")
                ]
            )
            broken = 0
            for tenant in sorted(tenants):
                result = await verify(conn, tenant)
                if result.ok:
                    print(f"{tenant}: ok ({result.entries} entries)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stead", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run the whole platform locally").set_defaults(func=cmd_dev)
    sub.add_parser("api", help="run the HTTP API").set_defaults(func=cmd_api)
    sub.add_parser("worker", help="run a worker").set_defaults(func=cmd_worker)
    sim = sub.add_parser("sim", help="run the local Messages-API simulator")
    sim.add_argument("--latency-ms", type=float, default=0.0)
    sim.set_defaults(func=cmd_sim)
    integ = sub.add_parser("integrations", help="run the loopback payment and email services")
    integ.add_argument("--token", default=None)
    integ.set_defaults(func=cmd_integrations)
    sub.add_parser("migrate", help="apply schema migrations").set_defaults(func=cmd_migrate)
    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="recompute hash chains")
    verify.add_argument("--tenant", default=None)
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
