"""Cutting a database's connections so that they come back, however the run ends.

`ALTER DATABASE ... ALLOW_CONNECTIONS false` then `pg_terminate_backend`, so clients cannot
reconnect in between (a rename or a TEMPLATE copy waits about 5 s for other sessions, then fails).
A marker in $BACKUP_DIR names the databases whose connections are cut; it is removed only once
they are allowed again, so when a run dies (or its server goes away) in between, the next run
under the same lock reads it and allows them first."""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import psycopg2

from .. import storage, trust
from ..errors import RollbackError
from ..log import get_logger
from . import database as db

DEFAULT_WAIT = 30.0


def marker_path(folder: Path, target: str) -> Path:
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    return folder / f".inflight_{storage.slug(target)}_{digest}.json"


def recover(conn, folder: Path, target: str) -> None:
    """Allow connections again where an interrupted run left them cut (call under the target's lock)."""
    marker = marker_path(folder, target)
    if not marker.exists():
        return
    try:
        names = trust.read_json(marker).get("databases", [])
    except (OSError, ValueError, AttributeError):
        names = [target]
    # Only the target and the databases a restore of it names: a marker cannot point anywhere else.
    names = [n for n in names if isinstance(n, str) and (n == target or n.startswith(db.name_prefix(target, "pre_rollback")))]
    for name in names or [target]:
        if db.allows_connections(conn, name) is False:
            db.set_allow_connections(conn, name, True)
            get_logger().warning("Connections to %s had been left cut by an interrupted run: allowed again.", name)
    marker.unlink()


def repair(info, folder: Path, script: str, pooler=None) -> None:
    """What every command does first when a killed run left the target's connections cut (or its
    PgBouncer paused): allow them again (resume it) under the target's lock, and say so; or, when
    that run is in fact still going, say that. Costs one file check when nothing was left."""
    from ..errors import LockHeld
    from ..locks import DatabaseLock
    from . import pgbouncer

    cut_left = marker_path(folder, info.dbname).exists()
    pause_left = pooler is not None and pgbouncer.marker_path(folder, pooler.database).exists()
    if not cut_left and not pause_left:
        return
    log = get_logger()
    try:
        lock = DatabaseLock(info, info.dbname, script).__enter__()
    except LockHeld as exc:
        log.warning("warning: connections to %s are cut by a rollback operation that is still running; it allows "
                    "them again when it ends (%s)", info.dbname, exc)
        return
    except RollbackError as exc:  # the server cannot be reached: the command itself says so
        log.debug("could not check for an interrupted run: %s", exc)
        return
    try:
        pgbouncer.recover(pooler, folder)
        recover(lock.conn, folder, info.dbname)
        leftovers = db.databases_like(lock.conn, db.name_prefix(info.dbname, "restore"))
        if leftovers:
            log.warning("The interrupted run also left %s; the next restore of %s removes it.",
                        ", ".join(leftovers), info.dbname)
    except (RollbackError, psycopg2.Error) as exc:
        log.warning("warning: an interrupted run left connections to %s cut, and allowing them again failed (%s). "
                    "Run: ALTER DATABASE %s WITH ALLOW_CONNECTIONS true", info.dbname,
                    db.reason(exc) if isinstance(exc, psycopg2.Error) else exc, info.dbname)
    finally:
        lock.release()


def allow_again(conn, name: str) -> bool:
    """True once `name` accepts connections (or does not exist); False when that could not be done."""
    try:
        if db.allows_connections(conn, name) is False:
            db.set_allow_connections(conn, name, True)
        return True
    except psycopg2.Error as exc:
        get_logger().error("could not allow connections to %s again (%s); the next run of this command "
                           "does it first", name, db.reason(exc))
        return False


@contextmanager
def cut(conn, folder: Path, target: str, also: List[str] = (), state: Optional["Cut"] = None,
        wait: float = DEFAULT_WAIT) -> Iterator["Cut"]:
    """`with cut(conn, folder, 'staging', also=[kept_as]) as c:` — connections to the target are
    refused and cut inside the block; on the way out, whatever happened, the target and `also`
    accept connections again (or the marker stays for the next run). Sessions this role may not
    cut (another superuser's) are waited for up to `wait` seconds, with connections allowed
    meanwhile, then named in a SessionsRemain error."""
    names = [target, *also]
    marker = marker_path(folder, target)
    storage.ensure_dir(folder)
    storage.write_json_atomic(marker, {"target": target, "databases": names, "pid": os.getpid(),
                                       "started": storage.utc_now().isoformat(timespec="seconds")})
    state = state or Cut()
    try:
        state.sessions_cut = cut_sessions(conn, target, wait)
        yield state
    finally:
        state.allowed = all([allow_again(conn, name) for name in names])
        if state.allowed:
            marker.unlink()


def cut_sessions(conn, target: str, wait: float = DEFAULT_WAIT) -> int:
    """Refuse new connections to the target and cut its sessions; returns how many were cut.

    Sessions are cut once. While a session this role may not cut (another superuser's) is there,
    nobody is cut: the blocker is named, clients keep working, and the cut happens only once it has
    gone. Cutting the others first and then waiting would cut an application that reconnects again
    and again (every second, for --wait seconds) for an operation that may then give up. Raises
    SessionsRemain, with connections allowed, when a blocker is still there after `wait` s."""
    log = get_logger()
    deadline = time.monotonic() + max(0.0, wait)
    done, announced, told = 0, False, 0.0
    while True:
        blockers = uncuttable(conn, target)
        if blockers:
            if time.monotonic() >= deadline:
                raise SessionsRemain(target, blockers, wait, done)
            if time.monotonic() - told >= 5:
                log.warning("waiting for %d session(s) this role may not cut (up to %.0f s more); nobody is cut "
                            "meanwhile: %s", len(blockers), deadline - time.monotonic(),
                            "; ".join(s.describe() for s in blockers))
                told = time.monotonic()
            time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
            continue
        began = time.monotonic()
        db.set_allow_connections(conn, target, False)
        found = db.sessions(conn, target)
        if found and not announced:
            log.info("Cutting %d connection(s) to %s:", len(found), target)
            db.log_sessions(found)
            announced = True
        count, refused = db.terminate_sessions(conn, target)
        done += count
        for _ in range(3):
            # A client whose connection passed the server's ALLOW_CONNECTIONS check just before it was
            # turned off shows up only now; left there, it would make the rename wait in steps of 100 ms.
            if refused:
                break
            late, refused = db.terminate_sessions(conn, target, wait=0.5)
            done += late
            if not late:
                break
        if not refused:
            done += db.end_starting_sessions(conn, target)
            vacuums = db.end_autovacuum_workers(conn, target)
            if vacuums:
                log.debug("ended %d autovacuum worker(s) in %s (a rename would wait 100 ms for them)", vacuums, target)
            log.debug("connections to %s refused and %d session(s) cut in %.1f ms", target, done,
                      (time.monotonic() - began) * 1000)
            return done
        # A blocker connected between the check and the cut: let clients in again and wait for it.
        db.set_allow_connections(conn, target, True)


def uncuttable(conn, target: str) -> List[db.Session]:
    """The target's sessions that this role may not terminate, told before anyone is cut, by the
    server's own rule: a superuser may end any session; anyone else only those of roles whose
    privileges it has (or all with pg_signal_backend), and never a superuser's."""
    found = db.sessions(conn, target)
    if not found:
        return []
    pids = {r[0] for r in db.rows(conn, """
        SELECT a.pid FROM pg_stat_activity a
        WHERE a.pid = ANY(%s::int[]) AND NOT (
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
            OR (NOT coalesce((SELECT rolsuper FROM pg_roles r WHERE r.oid = a.usesysid), false)
                AND (pg_has_role(current_user, a.usesysid, 'USAGE')
                     OR pg_has_role(current_user, 'pg_signal_backend', 'USAGE'))))""",
        ([s.pid for s in found],))}
    return [s for s in found if s.pid in pids]


def seal(conn, name: str, own: Sequence = ()) -> int:
    """Make a copy unchangeable: disallow connections, end every session on it but the toolkit's
    own `own` connections, and prove that none remains, nor a prepared transaction (which COMMIT
    PREPARED could still apply). From then on only `own` can change it; nobody can connect, not
    even a superuser, until connections are allowed again. Returns how many sessions were ended."""
    for c in own:
        # Parallel workers connect to the database like a client would: PostgreSQL 16+ refuses them once
        # connections are disallowed ("not currently accepting connections"), so our own check runs without.
        db.execute(c, "SET max_parallel_workers_per_gather = 0")
    db.set_allow_connections(conn, name, False)
    keep = [c.get_backend_pid() for c in own]
    ended, _ = db.terminate_sessions(conn, name, exclude=keep)
    left = db.sessions(conn, name, exclude=keep)
    prepared = [r[0] for r in db.rows(conn, "SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,))]
    if left or prepared:
        listed = [s.describe() for s in left] + [f"prepared transaction {gid!r}" for gid in prepared]
        raise SealFailed(f"{name} cannot be sealed: {len(listed)} session(s) or prepared transaction(s) this "
                         f"role cannot end remain on it ({'; '.join(listed)})")
    if ended:
        get_logger().warning("Ended %d session(s) connected to %s while it was being made: nothing may change "
                             "a copy once it is checked.", ended, name)
    return ended


class SealFailed(RollbackError):
    pass


class SessionsRemain(RollbackError):
    """Sessions of the target that the running role may not terminate, still there after the wait."""

    def __init__(self, target: str, found: List[db.Session], wait: float, cut: int = 0):
        self.sessions = found
        listed = "\n  ".join(s.describe() for s in found)
        cut_text = "no session was cut" if not cut else f"{cut} session(s) had been cut before one of these came"
        super().__init__(f"{len(found)} session(s) of {target} cannot be cut by this role and were still there "
                         f"after {wait:.0f} s ({cut_text}):\n  {listed}\n{target} is unchanged and accepts "
                         "connections. Ask "
                         "their owner to disconnect (or a superuser to run SELECT pg_terminate_backend(pid)), or "
                         "wait longer with --wait SECONDS, then run this again.")


class Cut:
    """What a cut did: how many sessions it ended, whether connections were allowed again after."""

    def __init__(self) -> None:
        self.sessions_cut = 0
        self.allowed = True
