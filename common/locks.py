"""One destructive operation per database at a time: a PostgreSQL advisory lock (DESIGN §3).

The lock lives in a session on the server's maintenance database, so it holds across machines,
and it is released by the server when our process dies, however it dies."""
from __future__ import annotations

import hashlib

from .errors import LockHeld
from .log import get_logger
from .pg.database import ConnInfo, app_name, maintenance_db, rows, scalar


def lock_key(dbname: str) -> int:
    """A signed 64-bit key for this database name (advisory locks are scoped to the server)."""
    digest = hashlib.sha256(f"rollback-toolkit:{dbname}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def try_session_lock(conn, key: int) -> bool:
    """Take an advisory lock for the session of `conn` (released when it closes) if nobody holds it."""
    return bool(scalar(conn, "SELECT pg_try_advisory_lock(%s)", (key,)))


def held_elsewhere(conn, key: int) -> bool:
    """Whether another session holds the advisory lock (asked by taking and releasing it at once)."""
    if try_session_lock(conn, key):
        scalar(conn, "SELECT pg_advisory_unlock(%s)", (key,))
        return False
    return True


class DatabaseLock:
    """`with DatabaseLock(info, 'staging', 'quick_rollback') as lock:` — lock.conn is an autocommit
    connection to the maintenance database, for the operation's own statements."""

    def __init__(self, info: ConnInfo, dbname: str, script: str):
        self.info, self.dbname, self.script = info, dbname, script
        self.conn = None

    def __enter__(self) -> "DatabaseLock":
        conn = maintenance_db(self.info, app=app_name(self.script))
        key = lock_key(self.dbname)
        if not scalar(conn, "SELECT pg_try_advisory_lock(%s)", (key,)):
            holder = self._holder(conn, key)
            conn.close()
            raise LockHeld(f"another rollback operation on database {self.dbname!r} is running ({holder}). "
                           "Nothing was changed. Wait for it to finish, then run this again.")
        self.conn = conn
        get_logger().debug("lock taken on %s (advisory key %s)", self.dbname, key)
        return self

    @staticmethod
    def _holder(conn, key: int) -> str:
        unsigned = key & 0xFFFFFFFFFFFFFFFF
        found = rows(conn, """
            SELECT a.application_name, a.pid, coalesce(host(a.client_addr), 'local socket'),
                   to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS')
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid""",
            (unsigned >> 32, unsigned & 0xFFFFFFFF))
        if not found:
            return "holder unknown"
        app, pid, client, since = found[0]
        return f"held by {app or 'a session'} (server pid {pid}, from {client}, since {since})"

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if not conn.closed:
                scalar(conn, "SELECT pg_advisory_unlock(%s)", (lock_key(self.dbname),))
        except Exception:  # the server drops the lock with the session anyway
            get_logger().debug("advisory unlock failed; closing the session releases it", exc_info=True)
        finally:
            conn.close()
