"""Server-side snapshots: `CREATE DATABASE <db>_snap_<ts> TEMPLATE <db>` (DESIGN §4, §5).

Needs nothing but psycopg2 and a role that may create databases: no client tools, so no version
mismatch. A TEMPLATE copy requires that nobody is connected to the source, so staging's
connections are cut for the copy (and allowed again on every path out)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Optional

import psycopg2

from .. import storage
from ..errors import BackupCorrupt, NotConfirmed, RollbackError, UsageError
from ..locks import DatabaseLock
from ..log import get_logger
from ..pg import connections, dbprops, frameworks
from ..pg import database as db
from ..pg.connections import DEFAULT_WAIT
from ..pg.database import ConnInfo
from ..testing import testhooks
from . import catalog, fingerprint, marks
from .catalog import RollbackPoint

TAG, SEP = "snap", "_"


class SnapshotFailed(RollbackError):
    pass


def require_createdb(conn, info: ConnInfo) -> None:
    if not db.can_create_databases(conn):
        raise SnapshotFailed(f"role {info.user or '(default)'} lacks the CREATEDB privilege, which a server-side "
                             f"snapshot needs (ALTER ROLE ... CREATEDB). Nothing was changed.")


def create_snapshot(info: ConnInfo, folder: Path, script: str, description: str = "",
                    lock: Optional[DatabaseLock] = None, wait: float = DEFAULT_WAIT,
                    confirm: Optional[Callable[[str, List[str]], None]] = None) -> RollbackPoint:
    """Copy the database on its own server; the sidecar records its tables and row counts and the
    database's own properties (owner, ACL, settings: a TEMPLATE copy does not carry them). The copy
    needs the database without sessions: those connected are listed and `confirm(question, lines)`
    asked before any is cut (without it, a database with sessions is refused)."""
    if lock is None:
        with DatabaseLock(info, info.dbname, script) as own:
            return create_snapshot(info, folder, script, description, lock=own, wait=wait, confirm=confirm)
    log = get_logger()
    conn = lock.conn
    require_createdb(conn, info)
    storage.ensure_dir(folder)
    started = time.monotonic()
    name = db.derived_name(info.dbname, TAG, storage.stamp(), SEP)
    major, version = db.server_version(conn)
    log.info("Creating snapshot %s of %s (PostgreSQL %s) ...", name, info.masked(), version)
    connections.recover(conn, folder, info.dbname)
    found = db.sessions(conn, info.dbname)
    if found:
        question = (f"A server-side snapshot copies {info.dbname} with TEMPLATE, which needs it without sessions: cut "
                    f"{len(found)} connection(s) to {info.dbname}?")
        lines = [f"connections that will be cut ({len(found)}):"] + [f"  {s.describe()}" for s in found] + [
            f"{info.dbname} refuses connections while it is copied (about {db.database_size(conn, info.dbname) >> 20} MB)"]
        if confirm is None:
            raise NotConfirmed(f"{question[:-1]}: not asked here. Nothing was changed.")
        confirm(question, lines)
    props = dbprops.read(conn, info.dbname)
    marks.intend(folder, name, TAG)  # a kill before the mark still leaves it provably this folder's
    with connections.cut(conn, folder, info.dbname, wait=wait) as cut:
        try:
            db.create_database(conn, name, template=info.dbname, like=info.dbname)
            testhooks.checkpoint("snapshot-copied")
        except psycopg2.Error as exc:
            raise SnapshotFailed(f"CREATE DATABASE {name} TEMPLATE {info.dbname} failed: {db.reason(exc)}. "
                                 "Nothing was changed.") from None
    unavailable = time.monotonic() - started
    if not cut.allowed:
        raise SnapshotFailed(f"snapshot {name} was made, but connections to {info.dbname} could not be allowed "
                             "again: run this command again, which allows them first")
    log.info("  %s serves again (unavailable for %.0f ms); counting rows in the snapshot ...",
             info.dbname, unavailable * 1000)
    own = None
    try:
        marks.put(conn, name, TAG, folder)
        # Counted on a connection opened before the seal, after every other session was ended (one
        # may have connected since the copy was made): the rows counted are the rows it keeps.
        own = db.connect(info.with_db(name))
        connections.seal(conn, name, [own])
        testhooks.checkpoint("snapshot-sealed")
        taken = fingerprint.take(own)
        tables, head, heads = fingerprint.counts(taken), db.migration_head(own), frameworks.heads(own) or None
        own.close()
        point = RollbackPoint(
            id=catalog.new_id(folder, info.dbname, description), kind=catalog.SNAPSHOT, database=info.dbname,
            description=description, created_at=storage.utc_now().isoformat(timespec="seconds"),
            source_url=info.masked().replace(":***", ""), server_version=version, method="snapshot",
            tool="CREATE DATABASE ... TEMPLATE", tool_version=f"PostgreSQL {version}", compression="-",
            snapshot_database=name, size_bytes=db.database_size(conn, name), tables=tables, migration_head=head,
            migration_heads=heads,
            duration_seconds=round(time.monotonic() - started, 3), folder=folder,
            database_properties=props.to_json() if props else None, fingerprint=taken)
        marks.put(conn, name, TAG, folder, point.id)
        catalog.save(point)
        marks.forget(folder, name)
    except BaseException:
        if own is not None and not own.closed:
            own.close()
        db.drop_database(conn, name)
        marks.forget(folder, name)
        raise
    return point


def exists_checker(info: ConnInfo):
    """A function telling whether a snapshot database exists (None when the server cannot be asked)."""
    try:
        conn = db.maintenance_db(info)
    except RollbackError:
        return lambda name: None
    names = {r[0] for r in db.rows(conn, "SELECT datname FROM pg_database")}
    conn.close()
    return lambda name: name in names


def orphans(conn, target: str, points: List[RollbackPoint], folder: Path) -> List[str]:
    """Snapshot databases of the target that carry this folder's mark and that no sidecar describes
    (another BACKUP_DIR's snapshots, and databases the toolkit did not make, are not orphans)."""
    known = {p.snapshot_database for p in points if p.kind == catalog.SNAPSHOT}
    return [n for n in db.databases_like(conn, db.name_prefix(target, TAG, SEP))
            if n not in known and marks.ours(conn, n, TAG, folder)]


def proven_ours(conn, point: RollbackPoint) -> bool:
    """Whether the snapshot's database carries the mark this toolkit set on it for this point and
    folder: a sidecar alone may name any database, V2 included."""
    mark = marks.read(conn, point.snapshot_database) if point.snapshot_database else None
    return mark is not None and mark.is_of(TAG, point.folder, point.id)


def resolve(folder: Path, ref: Optional[str], database: str, points: List[RollbackPoint]) -> RollbackPoint:
    """A snapshot by database name or sidecar id; without a name, the newest OK one of the database."""
    snapshots = [p for p in points if p.kind == catalog.SNAPSHOT and p.database == database]
    if ref is None:
        ok = [p for p in snapshots if p.status == catalog.OK]
        if not ok:
            raise UsageError(f"no OK snapshot of {database}. Nothing was changed. Make one with: "
                             "python3 simple_rollback.py create \"description\"")
        return ok[0]
    for p in snapshots:
        if ref in (p.id, p.snapshot_database):
            return p
    raise UsageError(f"no snapshot {ref!r} of {database} (see: python3 simple_rollback.py list). Nothing was changed.")


def copy_into(conn, point: RollbackPoint, fresh: str, like: Optional[str], owner: Optional[str] = None,
              tablespace: Optional[str] = None) -> None:
    """CREATE DATABASE fresh TEMPLATE snapshot: nobody may be connected to the snapshot (an
    autovacuum worker there is told to exit by the copy itself)."""
    name = point.snapshot_database
    if not db.database_exists(conn, name):
        raise RollbackError(f"snapshot database {name!r} does not exist (MISSING). Nothing was changed.")
    if not proven_ours(conn, point):
        raise RollbackError(not_ours(point))
    db.terminate_sessions(conn, name)
    db.create_database(conn, fresh, template=name, like=like, owner=owner, tablespace=tablespace)


def not_ours(point: RollbackPoint) -> str:
    return (f"database {point.snapshot_database!r}, which snapshot {point.id} names, does not carry the mark this "
            "toolkit sets on the snapshots it makes (made by an older version, or not by this toolkit): it is not "
            "used. Nothing was changed.")


def is_sealed(conn, point: RollbackPoint) -> bool:
    """True while nobody can have connected to the snapshot since it was counted: sessions were
    ended when it was sealed (its mark says this toolkit sealed it), and connections stay disallowed."""
    return db.allows_connections(conn, point.snapshot_database) is False and proven_ours(conn, point)


def check_tables(info: ConnInfo, point: RollbackPoint) -> tuple:
    """The copy of a sealed snapshot has the recorded tables; returns (tables, rows) as recorded."""
    conn = db.connect(info)
    try:
        found = {f"{s}.{t}" for s, t in db.user_tables(conn)}
    finally:
        conn.close()
    if found != set(point.tables):
        missing, extra = sorted(set(point.tables) - found), sorted(found - set(point.tables))
        raise RollbackError(f"the copy of snapshot {point.snapshot_database} does not have the recorded tables "
                            f"(missing {missing[:5]}, unexpected {extra[:5]}). The target was not touched.")
    return len(found), point.rows


def verify(info: ConnInfo, point: RollbackPoint) -> None:
    conn = db.maintenance_db(info)
    try:
        if not db.database_exists(conn, point.snapshot_database):
            raise BackupCorrupt(f"snapshot {point.id} is MISSING: database {point.snapshot_database!r} does not exist")
        if not proven_ours(conn, point):
            raise BackupCorrupt(not_ours(point))
        if is_sealed(conn, point):
            return
    finally:
        conn.close()
    counts = db.count_rows_parallel(info.with_db(point.snapshot_database))
    if counts != point.tables:
        raise BackupCorrupt(f"snapshot {point.id} was changed since it was made: its tables or row counts "
                            "differ from the sidecar")


def drop(conn, point: RollbackPoint) -> bool:
    """Drop the snapshot's database, only when this toolkit marked it for this point; False (and a
    warning) when the sidecar names a database that is not provably the snapshot."""
    if not point.snapshot_database or not db.database_exists(conn, point.snapshot_database):
        return False
    if not proven_ours(conn, point):
        get_logger().warning("not dropping %s: %s", point.snapshot_database, not_ours(point))
        return False
    db.drop_database(conn, point.snapshot_database)
    return True
