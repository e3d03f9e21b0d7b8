"""Drills: a rollback point restored for real where nobody works, proven, timed, then thrown away.

A backup that was never restored is a hope. A drill restores the point into a scratch database
`<db>__drill_<ts>` on staging's server, exactly as a rollback would fill its new database (the
dump through pg_restore with its sha256 hashed beside, or the snapshot copied), checks the result
against the point's fingerprint (content and schema; row counts for a point made before
fingerprints), times it against the database's recovery time objective, and drops the scratch
database on every way out. Staging is never touched and no session of it is cut: the scratch
database is a new one, and the advisory lock taken is the drill's own, not staging's.

The point records its last drill in its sidecar: when, whether OK, how many seconds, with which
tools, and why it failed. Scratch databases carry the toolkit's mark (common.points.marks), so a
run killed mid-drill leaves one that the next drill, or the next restore, provably may drop."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import psycopg2

from .. import storage
from ..errors import RollbackError
from ..locks import lock_key, try_session_lock
from ..log import get_logger
from ..pg import database as db
from ..pg.database import ConnInfo
from ..progress import timed
from ..testing import testhooks
from . import catalog, marks, snapshot, warm
from .catalog import RollbackPoint
from .check import check_against_point
from .fill import ChecksumBeside, fill_database, restorer

TAG = "drill"
DATABASE_OBJECTIVE = 1800  # seconds: the documents' recovery time objective for the database


@dataclass
class Drill:
    point: RollbackPoint
    ok: bool = False
    seconds: float = 0.0
    tools: str = ""
    error: str = ""
    scratch: str = ""
    checked: str = ""
    left_behind: str = ""  # the scratch database, when it could not be dropped
    at: str = field(default_factory=lambda: storage.utc_now().isoformat(timespec="seconds"))

    def record(self) -> dict:
        return {"at": self.at, "ok": self.ok, "seconds": round(self.seconds, 3), "tools": self.tools,
                "error": self.error or None}

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        met = "met" if self.seconds <= DATABASE_OBJECTIVE else "NOT met"
        text = (f"drill of {self.point.id}: {verdict} in {self.seconds:.1f} s (objective "
                f"{DATABASE_OBJECTIVE // 60} min: {met})")
        return text + (f"; {self.checked}" if self.ok else f": {self.error}")


def drill_key(database: str) -> int:
    return lock_key(f"drill:{database}")


def run(info: ConnInfo, point: RollbackPoint, folder: Path, pg_bin_dir: Optional[str]) -> Drill:
    """Restore the point into a scratch database beside staging, prove it, time it, drop it; record
    the result in the point's sidecar. Failures of the point are a failed drill, never an exception;
    errors of the drill itself (no server, the drill lock held) are raised."""
    result = Drill(point)
    conn = db.maintenance_db(info)
    try:
        if not try_session_lock(conn, drill_key(info.dbname)):
            raise RollbackError(f"another drill of {info.dbname} is running. Nothing was changed.")
        remove_orphans(conn, folder, info.dbname)
        room = warm.free_space(conn, point.size_bytes * 3 if point.kind == catalog.DUMP else
                               db.database_size(conn, point.snapshot_database))
        if room:  # a drill must never fill the disk of staging's server
            raise RollbackError(f"no room for the drill's scratch database: {room}. Nothing was changed.")
        major = db.server_version(conn)[0]
        name = result.scratch = db.derived_name(info.dbname, TAG, storage.stamp())
        get_logger().info("Drill: restoring point %s into the scratch database %s (staging is not touched) ...",
                          point.id, name)
        started = time.monotonic()
        marks.intend(folder, name, TAG)
        try:
            _restore(conn, info, point, name, major, pg_bin_dir, result)
            testhooks.checkpoint("drill-restored")
            with timed("drill: check against the point"):
                tables, rows, objects = check_against_point(info.with_db(name), point)
            result.ok = True
            result.checked = (f"content and schema identical to the point: {tables} tables, {rows} rows, {objects} "
                              "schema objects" if objects else
                              f"{tables} tables and {rows} rows match (row counts only: the point records no "
                              "fingerprint)")
        except (RollbackError, psycopg2.Error) as exc:
            result.error = db.reason(exc) if isinstance(exc, psycopg2.Error) else str(exc)
        finally:
            result.seconds = time.monotonic() - started
            if not _drop(conn, name, folder):
                result.left_behind = name
    finally:
        conn.close()
    save(point, result)
    return result


def _restore(conn, info: ConnInfo, point: RollbackPoint, name: str, major: int, pg_bin_dir: Optional[str],
             result: Drill) -> None:
    if point.kind == catalog.SNAPSHOT:
        result.tools = "CREATE DATABASE ... TEMPLATE (server-side copy of the snapshot)"
        snapshot.copy_into(conn, point, name, like=None)
        marks.put(conn, name, TAG, point.folder, point.id)
        return
    result.tools = restorer(point, major, pg_bin_dir)
    db.create_database(conn, name, like=info.dbname if db.database_exists(conn, info.dbname) else None)
    marks.put(conn, name, TAG, point.folder, point.id)
    with timed("drill: pg_restore and sha256"), ChecksumBeside(point):
        fill_database(info.with_db(name), point, major, pg_bin_dir)


def save(point: RollbackPoint, result: Drill) -> None:
    """The drill into the sidecar as it is now (another run may have written it meanwhile)."""
    try:
        now = catalog.load_sidecar(point.sidecar)
    except (OSError, ValueError) as exc:
        get_logger().warning("warning: the drill could not be recorded in %s: %s", point.sidecar, exc)
        return
    now.last_drill = result.record()
    catalog.save(now)
    point.last_drill = now.last_drill


def remove_orphans_unless_drilling(conn, folder: Path, database: str) -> List[str]:
    """remove_orphans, from a restore: only while no drill of the database runs."""
    if not db.databases_like(conn, db.name_prefix(database, TAG)):
        return []
    key = drill_key(database)
    if not try_session_lock(conn, key):  # held while removing: no drill starts meanwhile
        return []
    try:
        return remove_orphans(conn, folder, database)
    finally:
        db.scalar(conn, "SELECT pg_advisory_unlock(%s)", (key,))


def remove_orphans(conn, folder: Path, database: str) -> List[str]:
    """Scratch databases a killed drill of this folder left (call holding the drill lock)."""
    gone = []
    for name in db.databases_like(conn, db.name_prefix(database, TAG)):
        if marks.ours(conn, name, TAG, folder):
            get_logger().warning("Removing %s, left by an interrupted drill.", name)
            _drop(conn, name, folder)
            gone.append(name)
    return gone


def _drop(conn, name: str, folder: Path) -> bool:
    try:
        db.drop_database(conn, name)
    except psycopg2.Error as exc:
        get_logger().warning("could not drop the scratch database %s (%s); the next drill removes it", name,
                             db.reason(exc))
        return False
    marks.forget(folder, name)
    return True


def order_for_every(points: List[RollbackPoint], database: str) -> List[RollbackPoint]:
    """`drill --every`: every OK point of the database, the one drilled longest ago (or never) first."""
    ok = [p for p in points if p.status == catalog.OK and p.database == database]
    return sorted(ok, key=lambda p: (p.last_drill or {}).get("at") or "")


def text(point: RollbackPoint) -> str:
    """'drilled 2026-12-01 OK in 2.4 s', 'drill FAILED 2026-12-01: ...' or 'never drilled'."""
    d = point.last_drill
    if not d:
        return "never drilled"
    day = str(d.get("at", ""))[:10]
    if d.get("ok"):
        return f"drilled {day} OK in {float(d.get('seconds') or 0):.1f} s"
    return f"drill FAILED {day}: {d.get('error') or 'no reason recorded'}"


def failed(point: RollbackPoint) -> bool:
    return bool(point.last_drill) and not point.last_drill.get("ok")
