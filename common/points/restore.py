"""Checking and restoring rollback points: never half-done (DESIGN §5).

Default path: restore into a fresh `<db>__restore_<ts>` while the target serves, check it against
the sidecar, then cut connections and swap the names in one transaction. The replaced database is
kept as `<db>__pre_rollback_<ts>`. A kill at any moment leaves the target as it was or fully
restored; the next run removes leftovers and re-allows connections an interrupted run had cut."""
from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psycopg2
from psycopg2 import sql

from . import catalog, connections, dbprops, fingerprint, journal, pgbouncer, snapshot, testhooks, trust, warm
from . import database as db
from .catalog import RollbackPoint
from .connections import DEFAULT_WAIT
from .database import ConnInfo
from .dbprops import DatabaseProperties
from .errors import BackupCorrupt, RestoreFailed, RollbackError, ToolFailed, UsageError
from .locks import DatabaseLock
from .log import get_logger
from .pgbouncer import Pooler
from .pgtools import Tool, archive_tool_major, find_tool, list_archive
from .progress import Progress, human_size, timed
from .runner import Process, run

RESTORE_TAG, PREVIOUS_TAG = "restore", "pre_rollback"


class RestoreInterrupted(RestoreFailed):
    """Ctrl-C before the swap: the target is as it was (exit 130, as for any interrupt)."""

    exit_code = 130


def verify_point(point: RollbackPoint, pg_bin_dir: Optional[str] = None,
                 info: Optional[ConnInfo] = None) -> RollbackPoint:
    """Full check of a dump: size, sha256, and that pg_restore can read its table of contents;
    of a snapshot: its database exists and still holds the recorded tables and rows."""
    if point.kind == catalog.SNAPSHOT:
        if info is None:
            raise UsageError("checking a snapshot needs STAGING_DATABASE_URL (its database lives there)")
        snapshot.verify(info, point)
        point.status, point.problem = catalog.OK, ""
        return point
    progress = Progress("checking sha256", unit="")
    try:
        catalog.verify_checksum(point, on_progress=lambda done: progress.bytes(done, point.size_bytes))
    finally:
        progress.done()
    if point.kind == catalog.DUMP:
        pg_restore = restore_tool(point, archive_tool_major(point.tool_version), pg_bin_dir)
        try:
            entries = list_archive(pg_restore, str(point.path))
        except ToolFailed as exc:
            point.status, point.problem = catalog.CORRUPT, f"pg_restore cannot read it: {exc}"
            raise BackupCorrupt(f"rollback point {point.id} is CORRUPT: {point.problem}. Nothing was changed.") from None
        get_logger().debug("%s: %d archive entries readable by %s", point.id, entries, pg_restore.describe())
    point.status, point.problem = catalog.OK, ""
    return point


def restore_tool(point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str]) -> Tool:
    """pg_restore of the target server's major, never older than the pg_dump that wrote the archive
    (pg_restore 15 cannot read pg_dump 18's archive: 'unsupported version (1.16) in file header')."""
    archive_major = archive_tool_major(point.tool_version)
    return find_tool("pg_restore", server_major, pg_bin_dir, minimum=archive_major,
                     purpose=f"an archive written by pg_dump {point.tool_version} into PostgreSQL {server_major}")


@dataclass
class Plan:
    """What a restore will do, as the confirmation shows it."""

    info: ConnInfo
    point: RollbackPoint
    server_major: int
    server_version: str
    size_bytes: int
    sessions: List[db.Session]
    can_create: bool
    exists: bool
    source_text: Optional[str] = None  # set for a reset: where the fresh copy comes from
    current_props: Optional[DatabaseProperties] = None
    wanted_props: Optional[DatabaseProperties] = None
    props_note: str = ""
    wait: float = DEFAULT_WAIT
    no_warm: bool = False
    warm_reason: str = "not a dump"  # why the warm copy will not be used ('' when it will)
    pooler: Optional[Pooler] = None
    # Set by a reset that streams V2 in: fills the new database (given) and returns the row counts
    # to check it against, instead of pg_restore from the point's file.
    fill: Optional[Callable[[ConnInfo], Dict[str, int]]] = None
    fill_text: str = ""
    # Set when the point was read from a sidecar in the catalog: it is read again under the lock.
    from_catalog: bool = False

    def describe(self) -> List[str]:
        p = self.point
        lines = [f"target:         {self.info.masked()} (PostgreSQL {self.server_version}, "
                 f"{human_size(self.size_bytes) if self.exists else 'does not exist yet'})"]
        if self.source_text:
            lines.append(f"source:         {self.source_text}")
        else:
            lines += [f"rollback point: {p.id} ({p.kind}, {p.description or 'no description'}, created {p.created_at})",
                      f"                {len(p.tables)} tables, {p.rows} rows, migration head {p.migration_head or '-'}"]
        if self.can_create:
            fill = "copy the snapshot (TEMPLATE)" if p.kind == catalog.SNAPSHOT else "restore the dump"
            if self.source_text:
                fill = "copy it"
            elif p.kind == catalog.DUMP and not self.warm_reason and not self.no_warm:
                fill = f"copy the sealed warm copy {p.warm_database} (server-side; the dump if it fails its check)"
            elif p.kind == catalog.DUMP and p.warm_database and not self.no_warm:
                fill += f" ({self.warm_reason})"
            lines.append(f"method:         {fill} into a new database, check it, then swap names; the current "
                         f"{self.info.dbname} is kept as {self.info.dbname}__{PREVIOUS_TAG}_<timestamp>")
        else:
            lines.append("method:         in place, in one transaction (this role may not create databases)")
        lines += self.property_lines()
        if self.pooler is not None and self.can_create:
            lines.append(f"clients through {self.pooler.describe()}: paused, not failed, during the swap "
                         f"(at most {self.pooler.pause_timeout:.0f} s)")
        elif self.pooler is not None:
            lines.append(f"clients through {self.pooler.describe()}: not paused (an in-place restore takes "
                         "too long to hold them); they see errors until it ends")
        if self.sessions:
            lines.append(f"connections that will be cut ({len(self.sessions)}):")
            lines += [f"  {s.describe()}" for s in self.sessions]
        else:
            lines.append("connections that will be cut: none")
        return lines


    def property_lines(self) -> List[str]:
        if self.props_note:
            return [f"database properties: {self.props_note}"]
        changes = dbprops.describe_changes(self.current_props, self.wanted_props) if self.wanted_props else []
        if not changes:
            return ["database properties: owner, ACL, comment, settings as at the rollback point (unchanged)"]
        return [f"database properties that will change ({len(changes)}), back to the rollback point's:"] + \
            [f"  {line}" for line in changes]


@dataclass
class Result:
    target: str
    point: RollbackPoint
    method: str
    kept_as: Optional[str] = None
    seconds: float = 0.0
    unavailable_seconds: float = 0.0
    sessions_cut: int = 0
    tables_checked: int = 0
    rows_checked: int = 0
    notes: List[str] = field(default_factory=list)
    headline: Optional[str] = None
    paused_seconds: Optional[float] = None
    reference: str = "the rollback point"
    # Steps after the renames had committed that did not finish: the target is restored all the same.
    unfinished: List[str] = field(default_factory=list)
    dropped_replaced: List[str] = field(default_factory=list)  # older replaced databases dropped (retention)
    objects_checked: int = 0
    proof: str = "counts"  # "fingerprint": content and schema compared; "sealed": the seal proves it; "counts"

    def summary_lines(self) -> List[str]:
        p = self.point
        lines = [self.headline or f"Restored {self.target} from rollback point {p.id} ({p.description or 'no description'}).",
                 f"  method:       {self.method}",
                 f"  took:         {self.seconds:.1f} s; {self.target} was unavailable for "
                 f"{self.unavailable_seconds * 1000:.0f} ms",
                 f"  verification: {self.verification()}",
                 f"  connections cut: {self.sessions_cut}"]
        if self.paused_seconds is not None:
            lines.append(f"  PgBouncer:    clients paused for {self.paused_seconds * 1000:.0f} ms, then resumed "
                         "against the restored database")
        if self.kept_as:
            lines.append(f"  previous state kept as database {self.kept_as!r} "
                         "(remove with cleanup, or restore it by renaming if this rollback was wrong)")
        if self.dropped_replaced:
            lines.append(f"  older replaced databases dropped (ROLLBACK_KEEP_REPLACED): {', '.join(self.dropped_replaced)}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {self.target} IS restored, but this did not finish: {u}" for u in self.unfinished]
        return lines

    def verification(self) -> str:
        what = f"{self.tables_checked} tables, {self.rows_checked} rows, {self.objects_checked} schema objects"
        if self.proof == "fingerprint":
            return f"OK, content and schema identical to {self.reference}: {what} (row hashes and definitions compared)"
        if self.proof == "sealed" and self.objects_checked:
            return (f"OK, content and schema identical to {self.reference}: {what} (checked against its fingerprint "
                    "when sealed; nobody can have changed it since)")
        return (f"OK, {self.tables_checked} tables and {self.rows_checked} rows match {self.reference} (row counts "
                "only: it records no fingerprint)")

    def to_json(self) -> dict:
        return {"target": self.target, "point": self.point.id, "method": self.method, "kept_as": self.kept_as,
                "proof": self.proof, "objects_checked": self.objects_checked,
                "seconds": round(self.seconds, 3), "unavailable_seconds": round(self.unavailable_seconds, 4),
                "sessions_cut": self.sessions_cut, "tables_checked": self.tables_checked,
                "rows_checked": self.rows_checked, "verified": True, "notes": self.notes,
                "restored": True, "unfinished": self.unfinished, "dropped_replaced": self.dropped_replaced,
                "pgbouncer_paused_seconds": None if self.paused_seconds is None else round(self.paused_seconds, 4)}


def plan(info: ConnInfo, point: RollbackPoint, *, pg_bin_dir: Optional[str] = None, force: bool = False,
         check_backup: bool = True, source_text: Optional[str] = None, pooler: Optional[Pooler] = None) -> Plan:
    """Everything checked before anything changes: the backup whole, the target the right one,
    a pg_restore that can do the job."""
    if point.database and point.database != info.dbname and not force:
        raise UsageError(f"rollback point {point.id} is a backup of database {point.database!r}, not "
                         f"{info.dbname!r}. Nothing was changed. Pass --force to restore it anyway.")
    if check_backup and point.kind == catalog.DUMP:
        catalog.quick_check(point)
        if point.status != catalog.OK:
            raise BackupCorrupt(f"rollback point {point.id} is {point.status}: {point.problem}. Nothing was changed.")
    conn = db.maintenance_db(info)
    try:
        major, version = db.server_version(conn)
        exists = db.database_exists(conn, info.dbname)
        the_plan = Plan(info, point, major, version,
                        db.database_size(conn, info.dbname) if exists else 0,
                        db.sessions(conn, info.dbname) if exists else [],
                        db.can_create_databases(conn), exists, source_text=source_text, pooler=pooler)
        the_plan.from_catalog = point.folder is not None and point.sidecar.exists()
        snapshot_present = point.kind != catalog.SNAPSHOT or db.database_exists(conn, point.snapshot_database)
        if point.kind == catalog.SNAPSHOT and snapshot_present and not snapshot.proven_ours(conn, point):
            raise BackupCorrupt(snapshot.not_ours(point))
        _plan_properties(conn, the_plan)
        if point.kind == catalog.DUMP:
            the_plan.warm_reason = warm.unusable(conn, point)
        if point.kind == catalog.DUMP and point.path is not None:
            tool = restore_tool(point, major, pg_bin_dir)  # fail now, not after the confirmation
            _check_extensions(conn, info, archive_extensions(tool, point))
    finally:
        conn.close()
    if pooler is not None:
        pooler.check()  # a configured PgBouncer that does not answer is refused now, not mid-swap
    if point.kind == catalog.DUMP:
        if check_backup and not the_plan.can_create:
            verify_checksum_with_progress(point)  # in place touches the target at once: check first
    elif point.kind == catalog.SNAPSHOT:
        if not the_plan.can_create:
            raise snapshot.SnapshotFailed(f"restoring a snapshot needs the CREATEDB privilege, which role "
                                          f"{info.user or '(default)'} lacks. Nothing was changed.")
        if not snapshot_present:
            raise BackupCorrupt(f"snapshot {point.id} is MISSING: database {point.snapshot_database!r} does "
                                "not exist. Nothing was changed.")
    return the_plan


def refresh(the_plan: Plan, conn) -> List[str]:
    """Read again, under the lock, what the confirmation showed and the restore will use: the point
    (its sidecar), the target's properties and the warm copy's state; returns what changed since.
    A run that waited at its prompt must not set back properties, or use a point, as they were."""
    info, point = the_plan.info, the_plan.point
    changed = []
    if the_plan.from_catalog:
        try:
            now = catalog.load_sidecar(point.sidecar)
        except (OSError, ValueError):
            raise RestoreFailed(f"rollback point {point.id} was deleted or changed since the confirmation. Nothing "
                                "was changed; run the command again.") from None
        if (now.kind, now.file, now.sha256, now.size_bytes, now.snapshot_database, now.tables) != \
                (point.kind, point.file, point.sha256, point.size_bytes, point.snapshot_database, point.tables):
            raise RestoreFailed(f"rollback point {point.id} was changed since the confirmation. Nothing was changed; "
                                "run the command again.")
        if now.database_properties != point.database_properties:
            changed.append("the rollback point's recorded database properties")
        now.status, now.problem = point.status, point.problem
        the_plan.point = point = now
    props = lambda: [p.to_json() if p else None for p in (the_plan.current_props, the_plan.wanted_props)]  # noqa: E731
    shown = props()
    the_plan.exists = db.database_exists(conn, info.dbname)
    the_plan.size_bytes = db.database_size(conn, info.dbname) if the_plan.exists else 0
    the_plan.sessions = db.sessions(conn, info.dbname) if the_plan.exists else []
    _plan_properties(conn, the_plan)
    if props() != shown:
        changed.append(f"the properties of {info.dbname} (another run changed them while this one waited)")
    if point.kind == catalog.DUMP:
        the_plan.warm_reason = warm.unusable(conn, point)
    return changed


def _plan_properties(conn, the_plan: Plan) -> None:
    """Which database-level properties the restored database gets, and a check, on the current
    target in a transaction that is rolled back, that this role may set every one of them."""
    info, point = the_plan.info, the_plan.point
    current = dbprops.read(conn, info.dbname) if the_plan.exists else None
    wanted = dbprops.DatabaseProperties.from_json(point.database_properties)
    the_plan.current_props = current
    if wanted is None and current is not None:
        wanted = current
        the_plan.props_note = (f"{info.dbname} keeps its own (owner, ACL, comment, settings)" if the_plan.source_text
                               else f"the rollback point records none (made before they were recorded): "
                                    f"{info.dbname} keeps its current owner, ACL, comment and settings")
    the_plan.wanted_props = wanted
    if wanted is None or current is None:
        return
    if the_plan.can_create:
        # The new database starts as CREATE DATABASE leaves it, owned by the recorded owner; to learn
        # whether this role may make it so, the same statements run here first, and are undone.
        me = db.scalar(conn, "SELECT current_user")
        start = dbprops.blank(me, wanted.tablespace)
        dbprops.check_settable(conn, info.dbname, start, wanted)
    else:
        dbprops.check_settable(conn, info.dbname, current, wanted)


def archive_extensions(tool: Tool, point: RollbackPoint) -> List[str]:
    """The extensions a dump creates, from its table of contents (read before anything changes)."""
    try:
        toc = run([tool.path, "--list", str(point.path)], what=f"pg_restore {tool.version} --list").stdout
    except ToolFailed as exc:
        raise BackupCorrupt(f"rollback point {point.id} is CORRUPT: pg_restore cannot read it ({exc}). "
                            "The target was not touched.") from None
    return dbprops.extensions_in_archive(toc)


def _check_extensions(conn, info: ConnInfo, names: List[str]) -> None:
    problems = dbprops.uncreatable_extensions(conn, names)
    if problems:
        me = db.scalar(conn, "SELECT current_user")
        listed = "; ".join(f"{name}: {why}" for name, why in problems)
        raise RestoreFailed(f"the rollback point has extension(s) that role {me} cannot create on this server "
                            f"({listed}). Nothing was changed. Run the restore as a superuser, or have a "
                            "superuser install the extension's files (for one that is missing).")


def verify_checksum_with_progress(point: RollbackPoint) -> None:
    log = get_logger()
    log.info("Checking rollback point %s (sha256 of %s) ...", point.id, human_size(point.size_bytes))
    progress = Progress("checking sha256", unit="")
    try:
        catalog.verify_checksum(point, on_progress=lambda done: progress.bytes(done, point.size_bytes))
    finally:
        progress.done()


def execute(the_plan: Plan, *, script: str, folder: Path, pg_bin_dir: Optional[str] = None,
            drop_previous: bool = False, lock: Optional[DatabaseLock] = None,
            reconfirm: Optional[Callable[[str, List[str]], None]] = None,
            keep_replaced: Optional[int] = None) -> Result:
    """Carry out a confirmed plan under the target's lock (taken here unless the caller holds it).
    The plan is read again under the lock; when what was confirmed changed meanwhile, `reconfirm`
    (question, details) asks again, and without it the restore is refused."""
    if lock is None:
        with DatabaseLock(the_plan.info, the_plan.info.dbname, script) as own:
            return execute(the_plan, script=script, folder=folder, pg_bin_dir=pg_bin_dir,
                           drop_previous=drop_previous, lock=own, reconfirm=reconfirm, keep_replaced=keep_replaced)
    started = time.monotonic()
    conn = lock.conn
    recover_interrupted(conn, the_plan.info.dbname, folder, the_plan.pooler)
    changed = refresh(the_plan, conn)
    if changed:
        question = (f"Changed since the confirmation: {'; '.join(changed)}. Restore {the_plan.info.dbname} with "
                    "what is there now?")
        if reconfirm is None:
            raise RestoreFailed(f"{question[:-1]}: refused, as nobody can be asked. Nothing was changed; run the "
                                "command again.")
        reconfirm(question, the_plan.describe())
    if the_plan.can_create:
        result = _restore_by_swap(the_plan, conn, folder, pg_bin_dir, script)
        try:  # the target is restored: what fails from here on is named, not reported as a failed restore
            testhooks.checkpoint("restore-finishing")
            result.notes += _property_notes(the_plan)
            if drop_previous and result.kept_as:
                db.drop_database(conn, result.kept_as)
                result.notes.append(f"previous state {result.kept_as!r} dropped (--drop-previous)")
                result.kept_as = None
            if keep_replaced is not None:
                result.dropped_replaced = prune_replaced(conn, the_plan.info.dbname, keep_replaced)
        except Exception as exc:
            what = db.reason(exc) if isinstance(exc, psycopg2.Error) else (str(exc) or type(exc).__name__)
            result.unfinished.append(f"finishing after the swap: {what}" +
                                     (f"; the previous state stays as {result.kept_as!r}" if result.kept_as else ""))
    else:
        result = _restore_in_place(the_plan, conn, pg_bin_dir)
        result.notes += _property_notes(the_plan)
    try:
        journal.record(folder, the_plan.info.dbname, None if the_plan.source_text else the_plan.point.id,
                       the_plan.source_text or f"rollback point {the_plan.point.id}")
    except (OSError, RollbackError) as exc:
        result.unfinished.append(f"the restore journal (which verify reads) could not be written: {exc}")
    result.seconds = time.monotonic() - started
    return result


def prune_replaced(conn, target: str, keep: int) -> List[str]:
    """Drop all but the `keep` newest `<target>__pre_rollback_<ts>` databases (after a successful
    rollback or reset); returns the names dropped."""
    names = sorted(db.databases_like(conn, db.name_prefix(target, PREVIOUS_TAG)), reverse=True)
    dropped = []
    for name in names[max(0, keep):]:
        db.drop_database(conn, name)
        dropped.append(name)
    return dropped


def _property_notes(the_plan: Plan) -> List[str]:
    if the_plan.props_note:
        return [f"database properties: {the_plan.props_note}"]
    if the_plan.wanted_props is None:
        return []
    changed = dbprops.describe_changes(the_plan.current_props, the_plan.wanted_props)
    for line in changed:
        get_logger().debug("database property set back: %s", line)
    return [f"database properties: as at the rollback point ({len(changed)} changed back, as listed before "
            "the confirmation), and checked after setting them" if changed else
            "database properties: as at the rollback point (unchanged)"]


def recover_interrupted(conn, target: str, folder: Path, pooler: Optional[Pooler] = None) -> None:
    """Undo what a killed run left: a PgBouncer pause, connections it had cut, `__restore_`
    databases it had begun. Only called under the target's lock, so no other run is using them."""
    pgbouncer.recover(pooler, folder)
    connections.recover(conn, folder, target)
    warm.remove_orphans(conn, folder, target)
    for leftover in db.databases_like(conn, db.name_prefix(target, RESTORE_TAG)):
        get_logger().warning("Removing %s, left by an interrupted restore.", leftover)
        db.drop_database(conn, leftover)


def _restore_by_swap(the_plan: Plan, conn, folder: Path, pg_bin_dir: Optional[str], script: str) -> Result:
    log = get_logger()
    info, point = the_plan.info, the_plan.point
    target = info.dbname
    stamp = catalog.stamp()
    fresh = db.derived_name(target, RESTORE_TAG, stamp)
    keep_as = db.derived_name(target, PREVIOUS_TAG, stamp)
    result = Result(target, point, method="restore into a new database, then swap names")
    log.info("Restoring into %s while %s keeps serving ...", fresh, target)
    like = target if the_plan.exists else None
    wanted = the_plan.wanted_props
    owner, tablespace = (wanted.owner, wanted.tablespace) if wanted else (None, None)
    sealed = False
    if point.kind == catalog.SNAPSHOT:
        result.method = "copy of the snapshot into a new database (TEMPLATE), then swap names"
        sealed = snapshot.is_sealed(conn, point)
        try:
            with timed("copy of the snapshot"):
                snapshot.copy_into(conn, point, fresh, like, owner=owner, tablespace=tablespace)
        except psycopg2.Error as exc:
            _drop_quietly(conn, fresh)
            raise RestoreFailed(f"copying snapshot {point.snapshot_database} failed: {db.reason(exc)}. "
                                "Nothing was changed.") from None
    elif the_plan.fill is None and point.kind == catalog.DUMP and _warm_usable(conn, the_plan, result):
        result.method = f"copy of the warm copy {point.warm_database} (server-side), then swap names"
        sealed = True
        # The dump stays the checksummed truth: a point whose dump was rewritten, or whose recorded
        # sha256 was edited, since the copy was sealed is hashed in full beside the copy, and refused
        # when it does not match. Untouched, it is not read again: reading it would double the disk
        # reads of the copy (measured here on 1.1 GB from a cold cache: 6.0 s against 2.5 s).
        unchanged = bool(point.warm_dump_key) and point.warm_dump_key == warm.dump_key(point)
        check = nullcontext() if unchanged else ChecksumBeside(point)
        if unchanged:
            result.notes.append("the dump is as it was when the warm copy was sealed (size, mtime, inode and "
                                "recorded sha256); verify checks its full sha256")
        try:
            with timed("copy of the warm copy"), check:
                db.create_database(conn, fresh, template=point.warm_database, like=like, owner=owner,
                                   tablespace=tablespace)
        except BackupCorrupt:
            _drop_quietly(conn, fresh)
            raise
        except psycopg2.Error as exc:
            _drop_quietly(conn, fresh)
            raise RestoreFailed(f"copying the warm copy {point.warm_database} failed: {db.reason(exc)}. "
                                "Nothing was changed; run again with --no-warm to restore from the dump.") from None
    else:
        with timed("create the new database"):
            _create_like(conn, fresh, like, owner, tablespace)
    try:
        testhooks.checkpoint("restore-database-created")
        if the_plan.fill is not None:
            result.method = f"{the_plan.fill_text} into a new database, then swap names"
            with timed("streamed copy"):
                point.tables = the_plan.fill(info.with_db(fresh))
        elif point.kind == catalog.DUMP and not sealed:
            # The sha256 is checked while pg_restore fills the new database: the target is not
            # touched until the swap, and the swap waits for the verdict.
            with timed("pg_restore and sha256"), ChecksumBeside(point):
                fill_database(info.with_db(fresh), point, the_plan.server_major, pg_bin_dir)
        testhooks.checkpoint("restore-filled")
        with timed("check against the rollback point"):
            if sealed:
                # Nobody could connect to the sealed copy since it was checked against the point, and a
                # TEMPLATE copy is block for block (planner statistics included): the table list is the check.
                result.tables_checked, result.rows_checked = snapshot.check_tables(info.with_db(fresh), point)
                result.proof = "sealed"
            else:
                result.tables_checked, result.rows_checked, objects = check_against_point(info.with_db(fresh), point)
                result.proof = "fingerprint" if objects else "counts"
            result.objects_checked = len(point.fingerprint.get("objects", {})) if point.fingerprint else 0
        if wanted is not None:
            with timed("database properties"):
                dbprops.apply(conn, fresh, wanted)
        testhooks.checkpoint("restore-checked")
    except KeyboardInterrupt:
        _drop_quietly(conn, fresh)
        raise RestoreInterrupted(f"interrupted while the new copy was made: {target} is unchanged, and the new copy "
                                 f"{fresh} was removed.") from None
    except BaseException:
        _drop_quietly(conn, fresh)
        raise
    if not the_plan.exists:
        db.rename_database(conn, fresh, target)
        result.method = "restore into a new database, then rename (the target did not exist)"
        return result

    cut = connections.Cut()
    pause = the_plan.pooler.paused(folder) if the_plan.pooler else nullcontext()
    swapped = resuming = False
    try:
        with pause as paused:
            testhooks.checkpoint("restore-pooler-paused")
            cut_at = time.monotonic()
            with connections.cut(conn, folder, target, also=[keep_as], state=cut, wait=the_plan.wait):
                testhooks.checkpoint("restore-connections-cut")
                db.swap_names(conn, target, fresh, keep_as)
                swapped = True
                result.unavailable_seconds = time.monotonic() - cut_at
                result.sessions_cut, result.kept_as = cut.sessions_cut, keep_as
                testhooks.checkpoint("restore-swapped")
            testhooks.checkpoint("restore-connections-allowed")
            if paused is not None:
                result.paused_seconds = paused.seconds
            resuming = the_plan.pooler is not None  # what fails from here on is PgBouncer's RESUME
    except BaseException as exc:
        if not swapped:
            _drop_quietly(conn, fresh)
            if isinstance(exc, KeyboardInterrupt):
                still = "" if cut.allowed else " (it still refuses connections: any command allows them first)"
                raise RestoreInterrupted(f"interrupted before the swap: {target} is unchanged{still}, and the new "
                                         f"copy {fresh} was removed.") from None
            if isinstance(exc, psycopg2.Error):
                state = ("accepts connections again" if cut.allowed else
                         "still refuses connections: run this command again, which allows them first")
                raise RestoreFailed(f"the swap failed ({db.reason(exc)}); {target} is unchanged and {state}") from None
            raise
        # The renames have committed: the target IS restored, whatever failed after them.
        what = db.reason(exc) if isinstance(exc, psycopg2.Error) else (str(exc) or type(exc).__name__)
        if resuming:
            result.unfinished.append(
                f"PgBouncer could not be resumed ({what}): clients through it may still be paused. Resume them "
                f"with RESUME {the_plan.pooler.database} on its console, or run any restore command again, "
                "which resumes a pause a run left first")
        else:
            result.unfinished.append(f"after the swap: {what}")
    if swapped and not cut.allowed:
        result.unfinished.append(
            f"connections to {target} could not be allowed again: run python3 rollback_manager.py list (any "
            f"command that connects does it first), or ALTER DATABASE {target} WITH ALLOW_CONNECTIONS true")
    log.info("Swapped: %s is now the restored database; the previous one is %s.", target, keep_as)
    return result


def _warm_usable(conn, the_plan: Plan, result: Result) -> bool:
    """Whether the point's warm copy may be used; the summary says which path was taken and why."""
    point = the_plan.point
    if the_plan.no_warm:
        result.notes.append("restored from the dump: --no-warm")
        return False
    why = warm.unusable(conn, point)
    if why:
        if point.warm_database:
            get_logger().warning("Not using the warm copy: %s. Restoring from the dump instead.", why)
        result.notes.append(f"restored from the dump: {why}")
        return False
    result.notes.append(f"the warm copy was proven unchanged since it was sealed (still sealed, same OID "
                        f"and pg_database xmin); the dump {point.file} stays the checksummed truth")
    return True


class ChecksumBeside:
    """`with ChecksumBeside(point):` hashes the dump in a thread; on exit, a mismatch raises
    BackupCorrupt, which also explains a pg_restore that failed on the damaged file."""

    def __init__(self, point: RollbackPoint):
        self.point = point
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            catalog.verify_checksum(self.point)
        except BaseException as exc:  # reported in the calling thread
            self.error = exc

    def __enter__(self) -> "ChecksumBeside":
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        get_logger().info("  checksum verified: sha256 matches the sidecar")


def _create_like(conn, name: str, like: Optional[str], owner: Optional[str], tablespace: Optional[str]) -> None:
    try:
        db.create_database(conn, name, like=like, owner=owner, tablespace=tablespace)
    except psycopg2.Error as exc:
        raise RestoreFailed(f"cannot create {name}: {db.reason(exc)}. Nothing was changed.") from None


def _drop_quietly(conn, name: str) -> None:
    try:
        db.drop_database(conn, name)
    except psycopg2.Error as exc:
        get_logger().warning("could not drop %s (%s); the next run removes it", name, db.reason(exc))


# Settings a newer pg_restore sets on its connection that an older server does not know: pg_restore
# 17+ sends `SET transaction_timeout = 0`, which PostgreSQL 15 and 16 refuse ("unrecognized
# configuration parameter"). Such a restore goes through pg_restore's script, without these lines, into psql.
_NEWER_SETTINGS = {17: ("transaction_timeout",)}


def unknown_settings(tool_major: int, server_major: int) -> tuple:
    return tuple(name for major, names in _NEWER_SETTINGS.items() if tool_major >= major > server_major for name in names)


def restorer(point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str]) -> str:
    """How this machine restores the point into a server of that major ('' for a snapshot), or a
    ToolNotFound saying why it cannot: a point is OK only when something here can restore it."""
    if point.kind != catalog.DUMP:
        return ""
    tool = restore_tool(point, server_major, pg_bin_dir)
    if unknown_settings(tool.major, server_major):
        psql = find_tool("psql", server_major, pg_bin_dir)
        return f"{tool.describe()} through {psql.describe()}"
    return tool.describe()


def fill_database(target: ConnInfo, point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str],
                  tool: Optional[Tool] = None) -> None:
    """pg_restore the dump into an empty database (parallel jobs: the custom format allows it); a
    pg_restore newer than the server goes through its script into psql (see _NEWER_SETTINGS)."""
    tool = tool or restore_tool(point, server_major, pg_bin_dir)
    if unknown_settings(tool.major, server_major):
        _fill_through_psql(target, point, tool, find_tool("psql", server_major, pg_bin_dir), server_major)
        return
    jobs = max(2, min(4, os.cpu_count() or 2))
    progress = Progress("restoring", total=len(point.tables))

    def on_line(line: str) -> None:
        if "processing data for table" in line:
            progress.step(line.split("table", 1)[1].strip())

    get_logger().info("  %s, %d jobs, from %s", tool.describe(), jobs, point.path)
    argv = [tool.path, "--exit-on-error", "--verbose", f"--jobs={jobs}", "--no-password",
            "--dbname", conninfo_dbname(target.dbname), str(point.path)]
    try:
        run(argv, password=target.password, env=target.libpq_env(), on_stderr_line=on_line,
            what=f"pg_restore {tool.version}")
    except ToolFailed as exc:
        raise RestoreFailed(f"{exc}. The target was not touched.") from None
    finally:
        progress.done()


def _fill_through_psql(target: ConnInfo, point: RollbackPoint, tool: Tool, psql: Tool, server_major: int) -> None:
    """pg_restore --file=- | (without the SETs the server does not know) | psql, one stream."""
    get_logger().info("  %s through %s (pg_restore %d sets what PostgreSQL %d does not know: %s)", tool.describe(),
                      psql.describe(), tool.major, server_major, ", ".join(unknown_settings(tool.major, server_major)))
    producer = Process([tool.path, "--file=-", str(point.path)], env=target.libpq_env())
    try:
        with without_settings(producer, unknown_settings(tool.major, server_major)) as source:
            run([psql.path, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password", "--dbname",
                 conninfo_dbname(target.dbname)], password=target.password, env=target.libpq_env(), stdin=source,
                what=f"psql {psql.version} (restore of pg_restore {tool.version}'s script)")
        producer.wait(what=f"pg_restore {tool.version}")
    except ToolFailed as exc:
        producer.kill()
        raise RestoreFailed(f"{exc}. The target was not touched.") from None


@contextmanager
def without_settings(producer: Process, names: tuple):
    """A readable file of the producer's stdout without its `SET <name> ...` lines (none: as it is)."""
    if not names:
        yield producer.proc.stdout
        return
    drop = re.compile(rb"^SET (" + b"|".join(re.escape(n.encode()) for n in names) + rb") ")
    read_fd, write_fd = os.pipe()

    def relay() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink:
                for line in producer.proc.stdout:
                    if not drop.match(line):
                        sink.write(line)
        except OSError:
            pass  # the reader went away: its own error says why

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb") as source:
        yield source
    thread.join(timeout=5)


def conninfo_dbname(name: str) -> str:
    """A libpq conninfo naming only the database: safe for any name, even one with '=' or quotes."""
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"


def check_against_point(target: ConnInfo, point: RollbackPoint, opened: Sequence = ()) -> tuple:
    """The new database against the point, refused (target untouched) when it differs; returns
    (tables, rows, objects) checked. See compare_with_point."""
    problems, checked = compare_with_point(target, point, opened)
    if problems:
        raise RestoreFailed(f"the restored copy differs from the rollback point in {len(problems)} place(s) (" +
                            "; ".join(problems[:5]) + "). The target was not touched.")
    return checked


def compare_with_point(target: ConnInfo, point: RollbackPoint, opened: Sequence = ()) -> tuple:
    """With a fingerprint, content and schema (every row's hash, every object's definition,
    sequences, large objects); a point made before has its tables and row counts only. Returns
    (differences, (tables, rows, objects)). The database is analysed alongside (pg_restore leaves
    it without planner statistics). `opened`: connections to use, for a sealed copy."""
    if not point.fingerprint:
        counts = db.count_rows_parallel(target, workers=2, analyze=True, opened=opened)
        return diff_counts(point.tables, counts), (len(counts), sum(counts.values()), 0)
    actual = fingerprint_of(target, opened, analyze=True, like=point.fingerprint)
    return (fingerprint.differences(point.fingerprint, actual),
            (len(actual["tables"]), sum(fingerprint.counts(actual).values()), len(actual["objects"])))


def fingerprint_of(target: ConnInfo, opened: Sequence = (), analyze: bool = False, like: Optional[dict] = None,
                   workers: int = 2) -> dict:
    """The fingerprint of a database, taken by `workers` connections in one snapshot, with an ANALYZE
    beside it on one more. `like`: the fingerprint it is compared with (format, key ranges).
    `opened` (a sealed copy, which takes no new connection): the first takes it, the second analyses."""
    conns = list(opened) or [db.connect(target) for _ in range(workers + (1 if analyze else 0))]
    takers = conns[:1] if opened else conns[:workers]
    failure: List[BaseException] = []

    def run_analyze() -> None:
        try:
            db.execute(conns[len(takers)], "ANALYZE")
        except BaseException as exc:  # re-raised below
            failure.append(exc)

    worker = threading.Thread(target=run_analyze, daemon=True) if analyze and len(conns) > len(takers) else None
    try:
        if worker:
            worker.start()
        if len(takers) > 1:  # one snapshot for all: the database may be in use (verify)
            db.execute(takers[0], "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snapshot_id = db.scalar(takers[0], "SELECT pg_export_snapshot()")
            for helper in takers[1:]:
                db.execute(helper, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                db.execute(helper, "SET TRANSACTION SNAPSHOT %s", (snapshot_id,))
        taken = fingerprint.take(takers[0], like=like, helpers=takers[1:])
        if worker:
            worker.join()
    finally:
        for c in conns:
            if not c.closed:
                c.close()
    if failure:
        raise failure[0]
    return taken


def diff_counts(expected: Dict[str, int], actual: Dict[str, int]) -> List[str]:
    problems = [f"table {t} missing" for t in sorted(set(expected) - set(actual))]
    problems += [f"table {t} not in the rollback point" for t in sorted(set(actual) - set(expected))]
    problems += [f"{t}: {actual[t]} rows, expected {expected[t]}" for t in sorted(set(expected) & set(actual))
                 if expected[t] != actual[t]]
    return problems


def _restore_in_place(the_plan: Plan, conn, pg_bin_dir: Optional[str]) -> Result:
    """For a role that may not create databases: pg_restore --clean in one transaction, so a failure
    rolls back whole. Relations and schemas added since the point are dropped in that transaction."""
    log = get_logger()
    info, point = the_plan.info, the_plan.point
    result = Result(info.dbname, point, method="in place, in one transaction (the role may not create databases)")
    log.warning("This role may not create databases: restoring %s in place, in one transaction.", info.dbname)
    tool = restore_tool(point, the_plan.server_major, pg_bin_dir)
    psql = find_tool("psql", the_plan.server_major, pg_bin_dir)
    found = db.sessions(conn, info.dbname)
    if found:
        log.info("Cutting %d connection(s) to %s:", len(found), info.dbname)
        db.log_sessions(found)
    result.sessions_cut, refused = db.terminate_sessions(conn, info.dbname)
    if refused:
        log.warning("this role may not cut %d session(s); the restore waits for their locks: %s", len(refused),
                    "; ".join(s.describe() for s in refused))
    preamble = extra_objects_sql(info, tool, point) + _property_sql(conn, the_plan)
    cut_at = time.monotonic()
    producer = Process([tool.path, "--clean", "--if-exists", "--file=-", str(point.path)], env=info.libpq_env())
    unknown = unknown_settings(tool.major, the_plan.server_major)
    preamble_file = point.folder / f".inplace_{os.getpid()}.sql"
    with trust.create_file(preamble_file) as fh:
        fh.write(preamble)
    try:
        with without_settings(producer, unknown) as source:
            run([psql.path, "-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1", "--no-password",
                 "-f", str(preamble_file), "-f", "-"], password=info.password, env=info.libpq_env(),
                stdin=source, what=f"psql {psql.version} (in-place restore)")
        producer.wait(what=f"pg_restore {tool.version}")
    except ToolFailed as exc:
        producer.kill()
        raise RestoreFailed(f"{exc}. The transaction was rolled back: {info.dbname} is unchanged.") from None
    finally:
        preamble_file.unlink()
    result.unavailable_seconds = time.monotonic() - cut_at
    result.notes.append("in place: the database was locked for the whole restore")
    result.tables_checked, result.rows_checked, result.objects_checked = _check_after_in_place(info, point)
    result.proof = "fingerprint" if result.objects_checked else "counts"
    return result


def _property_sql(conn, the_plan: Plan) -> str:
    """The statements that give the target its recorded properties, for the restore's transaction."""
    if the_plan.wanted_props is None or the_plan.current_props is None:
        return ""
    todo = dbprops.statements(the_plan.info.dbname, the_plan.current_props, the_plan.wanted_props)
    return "".join(s.query.as_string(conn) + ";\n" for s in todo)


def _check_after_in_place(info: ConnInfo, point: RollbackPoint) -> tuple:
    problems, checked = compare_with_point(info, point)
    if problems:
        raise RestoreFailed(f"{info.dbname} was restored in place but differs from the rollback point in "
                            f"{len(problems)} place(s) (" + "; ".join(problems[:5]) + "). Check it before use.")
    return checked


def extra_objects_sql(info: ConnInfo, tool: Tool, point: RollbackPoint) -> str:
    """DROP statements for schemas, relations and large objects the target has and the archive does not."""
    toc = run([tool.path, "--list", str(point.path)], what="pg_restore --list").stdout
    in_archive = set()
    for line in toc.splitlines():
        parts = line.split()
        if line.startswith(";") or len(parts) < 7:
            continue
        # e.g. "215; 1259 16390 TABLE public customers postgres", "5; 2615 16385 SCHEMA - sales postgres"
        kind, rest = parts[3], parts[4:]
        if kind == "MATERIALIZED" and rest[0] == "VIEW":
            kind, rest = "VIEW", rest[1:]
        if kind == "SCHEMA":
            in_archive.add(("SCHEMA", rest[1], ""))
        elif kind == "EXTENSION":  # e.g. "12; 3079 16400 EXTENSION - citext"
            in_archive.add(("EXTENSION", rest[1], ""))
        elif kind in ("TABLE", "VIEW", "SEQUENCE") and rest[0] not in ("DATA", "SET", "OWNED"):
            in_archive.add(("REL", rest[0], rest[1]))
    conn = db.connect(info)
    try:
        statements = []
        schemas = db.rows(conn, """SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'
                                   AND nspname NOT IN ('information_schema', 'public')""")
        gone = set()
        # Extensions made since the point: --clean leaves them (the archive does not name them).
        for (name,) in db.rows(conn, "SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'"):
            if ("EXTENSION", name, "") not in in_archive:
                statements.append(sql.SQL("DROP EXTENSION IF EXISTS {} CASCADE;").format(sql.Identifier(name)))
        for (schema,) in schemas:
            if ("SCHEMA", schema, "") not in in_archive:
                gone.add(schema)
                statements.append(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE;").format(sql.Identifier(schema)))
        # Partitioned tables go first, whole: --clean would drop each partition's inherited primary
        # key on its own, which fails ("cannot drop inherited constraint"); its IF EXISTS drops
        # then find nothing, and the archive creates them again.
        for schema, name in db.rows(conn, """
                SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind = 'p' AND NOT c.relispartition AND n.nspname NOT LIKE 'pg\\_%'"""):
            if schema not in gone:
                statements.append(sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE;").format(
                    sql.Identifier(schema), sql.Identifier(name)))
        relations = db.rows(conn, """
            SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'v', 'm', 'S', 'p', 'f') AND n.nspname NOT LIKE 'pg\\_%'
              AND n.nspname <> 'information_schema'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i', 'e'))""")
        kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE", "f": "FOREIGN TABLE"}
        for schema, name, kind in relations:
            if schema not in gone and ("REL", schema, name) not in in_archive:
                statements.append(sql.SQL("DROP {} IF EXISTS {}.{} CASCADE;").format(
                    sql.SQL(kinds[kind]), sql.Identifier(schema), sql.Identifier(name)))
        # Large objects made since the point are not in the archive, and --clean only unlinks those
        # that are: unlink them all (the archive makes its own again, with their OIDs).
        statements.append(sql.SQL("SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;"))
        return "\n".join(s.as_string(conn) for s in statements) + "\n"
    finally:
        conn.close()
