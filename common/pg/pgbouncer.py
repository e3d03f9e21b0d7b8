"""PgBouncer around the swap: clients through the pooler wait instead of failing (DESIGN §5).

With PGBOUNCER_ADMIN_URL set (PgBouncer's admin console, e.g.
postgresql://admin:pw@127.0.0.1:6432/pgbouncer), the swap of every restore runs inside
`PAUSE <db>` ... `RESUME <db>`: PAUSE waits for the running transactions to end and then holds new
ones, so no client transaction meets the cut or the rename. The pause is bounded (--pause-timeout)
and always resumed; a marker in $BACKUP_DIR lets the next run resume a pause a killed run left."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import psycopg2

from .. import storage
from ..errors import RollbackError
from ..log import get_logger
from .database import ConnInfo, connect, reason

DEFAULT_PAUSE_TIMEOUT = 10.0


class PoolerFailed(RollbackError):
    """PgBouncer could not be reached, refused a command, or could not pause in time."""


@dataclass
class Pooler:
    """PgBouncer's admin console and the name of staging's database in it."""

    admin: ConnInfo
    database: str
    pause_timeout: float = DEFAULT_PAUSE_TIMEOUT

    def describe(self) -> str:
        return f"PgBouncer {self.admin.masked()} (database {self.database})"

    def console(self):
        conn = connect(self.admin, app="rollback-toolkit")
        conn.autocommit = True
        return conn

    def command(self, conn, text: str) -> None:
        """One admin console command; the database name is checked against SHOW DATABASES, never
        built from user input into anything but this console's own one-word argument."""
        with conn.cursor() as cur:
            cur.execute(text)

    def check(self) -> None:
        """Before anything changes: the console answers and knows the database."""
        try:
            conn = self.console()
        except RollbackError as exc:
            raise PoolerFailed(f"PgBouncer is configured (PGBOUNCER_ADMIN_URL) but cannot be reached: {exc}") from None
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW DATABASES")
                names = [row[0] for row in cur.fetchall()]
        except psycopg2.Error as exc:
            raise PoolerFailed(f"PgBouncer's console at {self.admin.masked()} refused SHOW DATABASES "
                               f"({reason(exc)}): is the user in admin_users? Nothing was changed.") from None
        finally:
            conn.close()
        if self.database not in names:
            raise PoolerFailed(f"PgBouncer at {self.admin.masked()} has no database {self.database!r} (it has: "
                               f"{', '.join(sorted(n for n in names if n != 'pgbouncer')) or 'none'}); set "
                               "PGBOUNCER_DATABASE. Nothing was changed.")

    @contextmanager
    def paused(self, folder: Path) -> Iterator["PauseState"]:
        """`with pooler.paused(folder) as p:` clients of the database wait inside the block; they are
        resumed on the way out however it ends (or by the next run, when this one is killed)."""
        state = PauseState()
        marker = marker_path(folder, self.database)
        storage.ensure_dir(folder)
        storage.write_json_atomic(marker, {"database": self.database, "admin": self.admin.masked(),
                                           "pid": os.getpid(), "started": storage.utc_now().isoformat()})
        conn = self.console()
        started = time.monotonic()
        try:
            self._pause(conn)
            state.paused_at = time.monotonic()
            get_logger().info("  PgBouncer paused %s (clients wait; %.0f ms to pause)", self.database,
                              (state.paused_at - started) * 1000)
            yield state
            # The cut ended every server connection of the pool (idle while paused), so after RESUME
            # PgBouncer opens new ones, by name, to the new database. RECONNECT says so explicitly,
            # for a pool whose connections the cut could not reach.
            try:
                self.command(conn, f"RECONNECT {self.database}")
            except psycopg2.Error as exc:  # e.g. a PgBouncer older than 1.15: the swap is done all the same
                get_logger().warning("PgBouncer refused RECONNECT %s (%s); its server connections were cut, so "
                                     "new ones reach the restored database", self.database, reason(exc))
        finally:
            state.seconds = time.monotonic() - (state.paused_at or started)
            try:
                self.command(conn, f"RESUME {self.database}")
            except psycopg2.Error as exc:
                if "not paused" not in str(exc):
                    get_logger().error("could not RESUME %s on PgBouncer (%s); the next run does it first",
                                       self.database, reason(exc))
                    raise
            finally:
                conn.close()
            marker.unlink()

    def _pause(self, conn) -> None:
        """PAUSE, bounded: it waits for running transactions; past the timeout, cancel it and fail
        (the caller's `finally` resumes, and nothing was swapped)."""
        timer = threading.Timer(self.pause_timeout, conn.cancel)
        timer.start()
        try:
            self.command(conn, f"PAUSE {self.database}")
        except psycopg2.Error as exc:
            raise PoolerFailed(f"PgBouncer could not pause {self.database} within {self.pause_timeout:.0f} s "
                               f"({reason(exc)}): a client transaction ran longer. Nothing was changed; "
                               "clients were resumed. Try again, or raise --pause-timeout.") from None
        finally:
            timer.cancel()


class PauseState:
    def __init__(self) -> None:
        self.paused_at: Optional[float] = None
        self.seconds = 0.0


def marker_path(folder: Path, database: str) -> Path:
    return folder / f".pgbouncer_paused_{storage.slug(database)}.json"


def recover(pooler: Optional[Pooler], folder: Path) -> None:
    """RESUME a pause that a killed run left (call under the target's lock)."""
    if pooler is None:
        return
    marker = marker_path(folder, pooler.database)
    if not marker.exists():
        return
    conn = pooler.console()
    try:
        pooler.command(conn, f"RESUME {pooler.database}")  # the configured name, never one read from the marker
        get_logger().warning("PgBouncer had been left paused for %s by an interrupted run: resumed.", pooler.database)
    except psycopg2.Error as exc:
        if "not paused" not in str(exc):
            raise PoolerFailed(f"could not resume {pooler.database} on PgBouncer: {reason(exc)}") from None
    finally:
        conn.close()
    marker.unlink()


def from_settings(settings, staging_db: str, url: Optional[str] = None, pause_timeout: Optional[float] = None,
                  database: Optional[str] = None) -> Optional[Pooler]:
    """The configured pooler, or None when PGBOUNCER_ADMIN_URL is not set."""
    admin_url = url or settings.get("PGBOUNCER_ADMIN_URL")
    if not admin_url:
        return None
    name = database or settings.get("PGBOUNCER_DATABASE") or staging_db
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise RollbackError(f"PGBOUNCER_DATABASE {name!r} is not a plain database name; PgBouncer's console "
                            "takes one word. Nothing was changed.")
    return Pooler(ConnInfo.parse(admin_url, what="PGBOUNCER_ADMIN_URL"), name,
                  DEFAULT_PAUSE_TIMEOUT if pause_timeout is None else pause_timeout)
