"""Warm copies: a sealed database holding exactly a dump rollback point, so that a rollback is a
rename, in constant time at any size and on any file system (DESIGN §5).

Made right after the dump, from the dump (pg_restore into `<db>__warm_<ts>`, while staging keeps
serving), checked against the sidecar's tables and row counts, then sealed: ALLOW_CONNECTIONS
false. The dump stays the portable, checksummed truth; the warm copy is only a faster way to it.

How a warm copy is proven unchanged before it is used: nobody can change a database without
connecting to it, and nobody (superusers included) can connect while its connections are
disallowed. Sealing disallows them, ends every session still open on the copy (one may have
connected while pg_restore filled it), proves that none remains, and only then checks the copy
against the point, on connections opened before the seal: what was checked is what stays.
Allowing connections again takes an ALTER DATABASE, which writes a new version of the database's
pg_database row, with a new xmin (VACUUM's in-place updates of datfrozenxid keep it). The sidecar
records the OID and that xmin at sealing; the copy is used only while it is still sealed with the
same OID and xmin, carries this folder's mark for this point (common.points.marks: copies sealed before
sessions were ended carry none), and has no session. Anything else, and the restore uses the dump.

A rollback takes the copy itself (`take`): no data is copied before staging is back. The point is
then re-armed (`rearm`) after staging serves: a new copy is restored from the dump, sealed and
checked as at creation. From the dump rather than from a spare copy kept beside the warm one: a
spare would hold a second full copy of the database on disk for every warm point, all the time, to
save a re-arm that nobody waits for (benchmarks/RESULTS.md measures both). A warm point therefore
costs one copy of disk, during a re-arm too (the copy it replaces became staging)."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import psycopg2

from .. import storage
from ..errors import BackupCorrupt, LockHeld, RestoreFailed, RollbackError
from ..locks import DatabaseLock, held_elsewhere, lock_key, try_session_lock
from ..log import get_logger
from ..pg import connections
from ..pg import database as db
from ..pg.database import ConnInfo
from ..progress import human_size, timed
from ..testing import testhooks
from . import catalog, marks
from .catalog import RollbackPoint
from .check import check_against_point
from .fill import ChecksumBeside, fill_database

TAG = "warm"
DEFAULT_KEEP = 1


@dataclass
class Seal:
    database: str
    oid: int
    xmin: str
    size_bytes: int
    dump_key: str = ""


def dump_key(point: RollbackPoint) -> str:
    """A fingerprint of the dump file as it is now (size, mtime, inode) and of the sha256 the sidecar
    records for it. While it is the one taken when the warm copy was sealed, nothing has rewritten
    the file or edited its checksum since that sha256 was computed from it, so a rollback through
    the warm copy need not read the whole dump again (verify, and every restore from the dump, do)."""
    try:
        st = os.stat(point.path)
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{point.sha256}".encode()).hexdigest()


def keep_setting(value: Optional[str]) -> int:
    """ROLLBACK_WARM_COPIES: how many of a database's newest points stay warm (0: none)."""
    if value is None or value == "":
        return DEFAULT_KEEP
    try:
        return max(0, int(value))
    except ValueError:
        raise RollbackError(f"ROLLBACK_WARM_COPIES must be a whole number (got {value!r})") from None


def seal_state(conn, name: str) -> Optional[tuple]:
    """(allows connections, oid, xmin, size) of a database, or None when it does not exist."""
    found = db.rows(conn, """SELECT datallowconn, oid, xmin::text, pg_database_size(oid)
                             FROM pg_database WHERE datname = %s""", (name,))
    return found[0] if found else None


def unusable(conn, point: RollbackPoint) -> str:
    """Why the point's warm copy may not be used ('' when it may): see the module's docstring."""
    if not point.warm_database:
        return "the rollback point has no warm copy"
    state = seal_state(conn, point.warm_database)
    if state is None:
        return f"its warm copy {point.warm_database} does not exist (dropped?)"
    allowed, oid, xmin, _ = state  # not the size: autovacuum may still add a visibility map
    if allowed or oid != point.warm_oid or xmin != point.warm_xmin:
        return f"its warm copy {point.warm_database} was changed since it was sealed"
    mark = marks.read(conn, point.warm_database)
    if mark is None or not mark.is_of(TAG, point.folder, point.id):
        return (f"its warm copy {point.warm_database} does not carry this folder's mark for the point (sealed by "
                "an older version, which did not end open sessions, or not made by this toolkit)")
    if db.sessions(conn, point.warm_database):
        return f"its warm copy {point.warm_database} has a session open"
    return ""


def free_space(conn, needed: int) -> Optional[str]:
    """Why a copy of `needed` bytes would not fit on the server's disk, when that can be learnt
    (the data directory is visible to this role and on this machine); None otherwise."""
    try:
        data_dir = db.scalar(conn, "SELECT setting FROM pg_settings WHERE name = 'data_directory'")
    except psycopg2.Error:
        return None
    if not data_dir or not os.path.isdir(data_dir):
        return None
    free = shutil.disk_usage(data_dir).free
    if free < needed * 1.2:
        return f"{human_size(free)} free beside the server's data, the copy needs about {human_size(needed)}"
    return None


def build(conn, info: ConnInfo, point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str],
          check_sha: bool = False) -> Optional[Seal]:
    """Make and seal the warm copy of a dump point; None (with a warning) when it cannot be made:
    the point stays OK either way, and nothing is left behind. check_sha: hash the dump beside
    pg_restore (a re-arm: the dump was not just written by this run)."""
    log = get_logger()
    needed = db.database_size(conn, info.dbname)
    room = free_space(conn, needed)
    if room:
        log.warning("No warm copy for %s: %s. The point is OK; a rollback will restore the dump.", point.id, room)
        return None
    name = db.derived_name(info.dbname, TAG, storage.stamp())
    log.info("Warm copy: restoring the point into %s while %s keeps serving ...", name, info.dbname)
    started = time.monotonic()
    own: list = []
    marks.intend(point.folder, name, TAG)  # a kill before the mark still leaves it provably ours
    try:
        db.create_database(conn, name, like=info.dbname)
        marks.put(conn, name, TAG, point.folder, point.id)
        testhooks.checkpoint("warm-created")
        with timed("warm copy: pg_restore"), (ChecksumBeside(point) if check_sha else nullcontext()):
            try:
                fill_database(info.with_db(name), point, server_major, pg_bin_dir)
            except RestoreFailed as exc:  # the dump itself does not restore here: the point is not OK
                point.restore_problem = f"restoring its dump failed when its warm copy was built ({exc})"
                raise
        # The check runs on connections opened before the seal, after every other session has
        # been ended: what it counts is what the copy keeps.
        own = [db.connect(info.with_db(name)) for _ in range(2)]
        connections.seal(conn, name, own)
        testhooks.checkpoint("warm-sealed")
        with timed("warm copy: check against the point"):
            check_against_point(info.with_db(name), point, opened=own)
        _, oid, xmin, size = seal_state(conn, name)
    except BackupCorrupt:  # the dump itself is damaged: not a missing warm copy, a broken point
        _close(own)
        _drop_quietly(conn, name, point.folder)
        raise
    except (RollbackError, psycopg2.Error) as exc:
        log.warning("No warm copy for %s (%s). The point is OK; a rollback will restore the dump.", point.id,
                    db.reason(exc) if isinstance(exc, psycopg2.Error) else exc)
        _close(own)
        _drop_quietly(conn, name, point.folder)
        return None
    except BaseException:
        _close(own)
        _drop_quietly(conn, name, point.folder)
        raise
    log.info("  warm copy %s sealed (%s, %.1f s)", name, human_size(size), time.monotonic() - started)
    return Seal(name, oid, xmin, size, dump_key(point))


def _close(conns: list) -> None:
    for c in conns:
        if not c.closed:
            c.close()


def record(point: RollbackPoint, seal: Optional[Seal]) -> None:
    point.warm_database = seal.database if seal else None
    point.warm_oid = seal.oid if seal else None
    point.warm_xmin = seal.xmin if seal else None
    point.warm_size_bytes = seal.size_bytes if seal else None
    point.warm_dump_key = seal.dump_key if seal else None


def may_stay_warm(point: RollbackPoint, keep: int) -> bool:
    """Whether retention (prune) keeps this point's warm copy: fewer than `keep` newer points of its
    database are warm."""
    newer_warm = 0
    for other in catalog.scan(point.folder):
        if other.id == point.id:
            return newer_warm < keep
        if other.database == point.database and other.warm_database:
            newer_warm += 1
    return False


def prune(conn, folder: Path, database: str, keep: int) -> List[str]:
    """Drop the warm copies of all but the `keep` newest points of the database (their sidecars
    say so first: a sidecar never names a copy that is gone). Only copies that carry this folder's
    mark for that point are dropped: a sidecar naming any other database is not obeyed."""
    dropped = []
    warm_points = [p for p in catalog.scan(folder) if p.database == database and p.warm_database]
    for point in warm_points[keep:]:
        name = point.warm_database
        mark = marks.read(conn, name)
        record(point, None)
        catalog.save(point)
        if mark is None or not mark.is_of(TAG, folder, point.id):
            get_logger().warning("Point %s named %s as its warm copy, which does not carry this folder's mark for "
                                 "it: left alone, and the point no longer names it.", point.id, name)
            continue
        _drop_quietly(conn, name)
        dropped.append(name)
        get_logger().info("Dropped the warm copy of older point %s (%s); its dump stays.", point.id, name)
    return dropped


def remove_orphans(conn, folder: Path, database: str) -> List[str]:
    """Drop `<db>__warm_` databases that carry this folder's mark and that no sidecar of it names:
    left by a run killed while making one (call under the database's lock, so no other run is
    making one now). Another BACKUP_DIR's copies, and unmarked ones, are never touched."""
    named = {p.warm_database for p in catalog.scan(folder) if p.warm_database}
    gone = []
    present = db.databases_like(conn, db.name_prefix(database, TAG))
    if present and rearm_running(conn, database):
        get_logger().info("A warm copy of %s is being re-armed by another run: its copies are left alone.", database)
        return gone
    for name in present:
        if name in named or not marks.ours(conn, name, TAG, folder):
            continue
        get_logger().warning("Removing %s, a warm copy no rollback point names (an interrupted run's).", name)
        _drop_quietly(conn, name, folder)
        gone.append(name)
    prefix = db.name_prefix(database, TAG)
    for name in marks.intended(folder, TAG):
        if name.startswith(prefix) and (name in named or name not in present):
            marks.forget(folder, name)  # made and recorded, or never made: the note has done its work
    return gone


def drop(conn, point: RollbackPoint) -> bool:
    """Drop the point's warm copy, only when it carries this folder's mark for the point."""
    name = point.warm_database
    if not name or not db.database_exists(conn, name):
        return False
    mark = marks.read(conn, name)
    if mark is None or not mark.is_of(TAG, point.folder, point.id):
        get_logger().warning("not dropping %s: point %s names it as its warm copy, but it does not carry this "
                             "folder's mark for that point", name, point.id)
        return False
    db.drop_database(conn, name)
    return True


def _drop_quietly(conn, name: str, folder: Optional[Path] = None) -> None:
    try:
        db.drop_database(conn, name)
    except psycopg2.Error as exc:
        get_logger().warning("could not drop %s (%s); the next run removes it", name, db.reason(exc))
        return
    if folder is not None:
        marks.forget(folder, name)


def take(conn, point: RollbackPoint, fresh: str) -> None:
    """Make the point's sealed warm copy the database `fresh` that a restore then swaps in. The
    sidecar stops naming it first, so a kill at any moment leaves either a sealed copy no sidecar
    names (an orphan the next run drops) or a `<db>__restore_` database (which the next restore
    removes): the point is then simply not warm, and its dump stays the point. Proven still sealed,
    with no session, after the rename; the mark is removed (the restore sets the recorded comment)."""
    name, oid = point.warm_database, point.warm_oid
    record(point, None)
    catalog.save(point)
    db.rename_database(conn, name, fresh)  # fails, with nothing renamed, while any session is on it
    state = seal_state(conn, fresh)
    if state is None or state[0] or state[1] != oid or db.sessions(conn, fresh):
        raise RollbackError(f"the warm copy {name} was changed while it was taken (now {state}); it is not used")
    with conn.cursor() as cur:
        cur.execute(db.sql.SQL("COMMENT ON DATABASE {} IS NULL").format(db.sql.Identifier(fresh)))


def give_back(conn, point: RollbackPoint, fresh: str, name: str) -> bool:
    """A restore that took the warm copy failed before its swap: the copy, never connectable since it
    was checked (connections are allowed only in the swap's own commit), goes back under its name,
    marked again and recorded with its new pg_database xmin. False (and it is dropped) otherwise."""
    try:
        state = seal_state(conn, fresh)
        if state is None or state[0] or db.sessions(conn, fresh):
            raise RollbackError("it is no longer sealed")
        db.rename_database(conn, fresh, name)
        marks.put(conn, name, TAG, point.folder, point.id)
        _, oid, xmin, size = seal_state(conn, name)
        now = catalog.load_sidecar(point.sidecar)
        record(now, Seal(name, oid, xmin, size, dump_key(now)))
        catalog.save(now)
        record(point, Seal(name, oid, xmin, size, dump_key(now)))
        return True
    except (RollbackError, psycopg2.Error, OSError, ValueError) as exc:
        get_logger().warning("The warm copy could not be given back to point %s (%s): it is dropped, and the next "
                             "rollback restores the dump.", point.id,
                             db.reason(exc) if isinstance(exc, psycopg2.Error) else exc)
        _drop_quietly(conn, fresh)
        _drop_quietly(conn, name)
        return False


def rearm_key(database: str) -> int:
    return lock_key(f"rearm:{database}")


def rearm_running(conn, database: str) -> bool:
    """Whether another session holds the re-arm lock of the database (a re-arm is under way)."""
    return held_elsewhere(conn, rearm_key(database))


@dataclass
class Rearmed:
    ok: bool
    seconds: float
    note: str


def rearm(info: ConnInfo, point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str],
          keep: int = DEFAULT_KEEP) -> Rearmed:
    """After a rollback took the point's warm copy, build a new one from the dump while staging
    serves. Runs without the target's lock (a second rollback need not wait for it: it restores the
    dump), under a re-arm lock that keeps other runs from dropping the copy as an orphan. Ctrl-C or
    a failure only leaves the point not warm; staging is never touched."""
    started = time.monotonic()
    again = f"`python3 rollback_manager.py warm --file {point.id}` re-arms it"
    conn = db.maintenance_db(info)
    try:
        if not try_session_lock(conn, rearm_key(info.dbname)):
            return Rearmed(False, 0.0, f"another run is re-arming a warm copy of {info.dbname}; {again}")
        get_logger().info("Re-arming point %s: a new warm copy from its dump, while %s serves ...", point.id,
                          info.dbname)
        try:
            seal = build(conn, info, point, server_major, pg_bin_dir, check_sha=True)
        except KeyboardInterrupt:
            return Rearmed(False, time.monotonic() - started,
                           f"interrupted: the point is not warm (the next rollback restores its dump); {again}")
        except BackupCorrupt as exc:
            get_logger().error("error: point %s: %s", point.id, exc)
            return Rearmed(False, time.monotonic() - started, f"its dump does not match its recorded sha256: the "
                           f"point is CORRUPT (`python3 rollback_manager.py verify --file {point.id}`)")
        if seal is None:
            return Rearmed(False, time.monotonic() - started, f"the new warm copy could not be made (see above); "
                           f"the next rollback restores the dump; {again}")
        return _record_rearmed(conn, info, point, seal, keep, started, again)
    finally:
        conn.close()


def _record_rearmed(conn, info: ConnInfo, point: RollbackPoint, seal: Seal, keep: int, started: float,
                    again: str) -> Rearmed:
    """Under the target's lock, as creation, retention and delete record theirs: the sidecar as it is
    now, the point still there with its dump and still among those retention keeps warm."""
    try:
        with DatabaseLock(info, info.dbname, "rearm"):
            try:
                now = catalog.load_sidecar(point.sidecar)
            except (OSError, ValueError):
                now = None
            why = ("the point was deleted meanwhile" if now is None or now.path is None or not now.path.exists() else
                   "newer points are warm now (ROLLBACK_WARM_COPIES)" if not may_stay_warm(now, keep) else "")
            if why:
                _drop_quietly(conn, seal.database, point.folder)
                return Rearmed(False, time.monotonic() - started, f"not recorded: {why}; the new copy was dropped")
            record(now, seal)
            catalog.save(now)
            marks.forget(point.folder, seal.database)
            testhooks.checkpoint("rearm-recorded")
    except LockHeld:
        _drop_quietly(conn, seal.database, point.folder)
        return Rearmed(False, time.monotonic() - started, f"another operation on {info.dbname} holds its lock, so the "
                       f"new copy could not be recorded and was dropped; {again}")
    return Rearmed(True, time.monotonic() - started, f"warm copy {seal.database} sealed and checked")
