"""Checking and restoring rollback points: never half-done (DESIGN §5).

Default path: restore into a fresh `<db>__restore_<ts>` while the target serves, check it against
the sidecar, then cut connections and swap the names in one transaction. The replaced database is
kept as `<db>__pre_rollback_<ts>`. A kill at any moment leaves the target as it was or fully
restored; the next run removes leftovers and re-allows connections an interrupted run had cut."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional

import psycopg2

from .. import journal, storage
from ..errors import RestoreFailed, RollbackError
from ..locks import DatabaseLock
from ..log import get_logger
from ..pg import connections, dbprops, pgbouncer
from ..pg import database as db
from ..pg.pgbouncer import Pooler
from ..progress import timed
from ..testing import testhooks
from . import catalog, drill, snapshot, warm
from .check import check_against_point, diff_counts
from .fill import ChecksumBeside, fill_database, verify_checksum_with_progress
from .in_place import restore_in_place
from .plan import PREVIOUS_TAG, RESTORE_TAG, Plan, Result, check_extensions, heads_of, plan, property_notes, refresh

# A restore's entry points: plan it (before the confirmation), then execute the plan.
__all__ = ["Plan", "Result", "RestoreInterrupted", "execute", "heads_of", "plan", "prune_replaced",
           "recover_interrupted"]


class RestoreInterrupted(RestoreFailed):
    """Ctrl-C before the swap: the target is as it was (exit 130, as for any interrupt)."""

    exit_code = 130


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
    started = the_plan.started = time.monotonic()
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
            result.notes += property_notes(the_plan)
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
        result = restore_in_place(the_plan, conn, pg_bin_dir)
        result.notes += property_notes(the_plan)
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


def recover_interrupted(conn, target: str, folder: Path, pooler: Optional[Pooler] = None) -> None:
    """Undo what a killed run left: a PgBouncer pause, connections it had cut, `__restore_`
    databases it had begun. Only called under the target's lock, so no other run is using them."""
    pgbouncer.recover(pooler, folder)
    connections.recover(conn, folder, target)
    warm.remove_orphans(conn, folder, target)
    drill.remove_orphans_unless_drilling(conn, folder, target)
    for leftover in db.databases_like(conn, db.name_prefix(target, RESTORE_TAG)):
        get_logger().warning("Removing %s, left by an interrupted restore.", leftover)
        db.drop_database(conn, leftover)


def _restore_by_swap(the_plan: Plan, conn, folder: Path, pg_bin_dir: Optional[str], script: str) -> Result:
    log = get_logger()
    info, point = the_plan.info, the_plan.point
    target = info.dbname
    stamp = storage.stamp()
    fresh = db.derived_name(target, RESTORE_TAG, stamp)
    keep_as = db.derived_name(target, PREVIOUS_TAG, stamp)
    result = Result(target, point, method="restore into a new database, then swap names")
    like = target if the_plan.exists else None
    wanted = the_plan.wanted_props
    owner, tablespace = (wanted.owner, wanted.tablespace) if wanted else (None, None)
    sealed = False
    if point.kind == catalog.SNAPSHOT:
        log.info("Restoring into %s while %s keeps serving ...", fresh, target)
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
        # The warm copy itself is swapped in: renamed, not copied, so the rollback takes the same time at
        # any size. The dump stays the checksummed truth: one rewritten, or whose recorded sha256 was
        # edited, since the copy was sealed is hashed in full first, and refused when it does not match.
        # Untouched, it is not read again (verify, and every restore from the dump, do).
        result.method = f"swap in the sealed warm copy {point.warm_database} (renamed into place, nothing copied)"
        sealed = True
        if point.warm_dump_key and point.warm_dump_key == warm.dump_key(point):
            result.notes.append("the dump is as it was when the warm copy was sealed (size, mtime, inode and "
                                "recorded sha256); verify checks its full sha256")
        else:
            verify_checksum_with_progress(point)
        log.info("Taking the sealed warm copy %s as %s, to swap it in ...", point.warm_database, fresh)
        taken_from = point.warm_database
        try:
            with timed("take the warm copy"):
                warm.take(conn, point, fresh)
        except (psycopg2.Error, RollbackError, OSError) as exc:
            _drop_quietly(conn, fresh)
            what = db.reason(exc) if isinstance(exc, psycopg2.Error) else exc
            raise RestoreFailed(f"taking the warm copy {point.warm_database} failed: {what}. {target} is unchanged; "
                                "run again (or with --no-warm) to restore from the dump.") from None
        result.rearm = True
        result.taken_from = taken_from
    else:
        if point.kind == catalog.DUMP and the_plan.fill is None:  # not checked when a warm copy was planned
            check_extensions(conn, the_plan, pg_bin_dir)
        log.info("Restoring into %s while %s keeps serving ...", fresh, target)
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
            if sealed and point.kind == catalog.DUMP:
                # The warm copy itself: nobody could connect to it since it was checked against the point.
                result.tables_checked, result.rows_checked = len(point.tables), point.rows
                result.proof = "sealed"
            elif sealed:
                # Nobody could connect to the sealed snapshot since it was checked against the point, and a
                # TEMPLATE copy is block for block (planner statistics included): the table list is the check.
                result.tables_checked, result.rows_checked = snapshot.check_tables(info.with_db(fresh), point)
                result.proof = "sealed"
            elif the_plan.fill_counts is not None and the_plan.fill_counts() is not None:
                counted = the_plan.fill_counts()  # every table, counted as its data was loaded
                problems = diff_counts(point.tables, counted)
                if problems:
                    raise RestoreFailed(f"the new copy differs from the source in {len(problems)} place(s) (" +
                                        "; ".join(problems[:5]) + "). The target was not touched.")
                result.tables_checked, result.rows_checked = len(counted), sum(counted.values())
            else:
                result.tables_checked, result.rows_checked, objects = check_against_point(info.with_db(fresh), point)
                result.proof = "fingerprint" if objects else "counts"
            result.objects_checked = len(point.fingerprint.get("objects", {})) if point.fingerprint else 0
        if wanted is not None:
            with timed("database properties"):
                dbprops.apply(conn, fresh, wanted)
        testhooks.checkpoint("restore-checked")
    except KeyboardInterrupt:
        _discard(conn, fresh, result)
        raise RestoreInterrupted(f"interrupted while the new copy was made: {target} is unchanged, and the new copy "
                                 f"{fresh} was removed.") from None
    except BaseException:
        _discard(conn, fresh, result)
        raise
    if not the_plan.exists:
        db.rename_database(conn, fresh, target, allow=result.rearm)  # a warm copy was sealed
        result.back_seconds = time.monotonic() - the_plan.started
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
                db.swap_names(conn, target, fresh, keep_as, allow=result.rearm)
                swapped = True
                result.back_seconds = time.monotonic() - the_plan.started
                result.unavailable_seconds = time.monotonic() - cut_at
                result.sessions_cut, result.kept_as = cut.sessions_cut, keep_as
                testhooks.checkpoint("restore-swapped")
            testhooks.checkpoint("restore-connections-allowed")
            if paused is not None:
                result.paused_seconds = paused.seconds
            resuming = the_plan.pooler is not None  # what fails from here on is PgBouncer's RESUME
    except BaseException as exc:
        if not swapped:
            _discard(conn, fresh, result)
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


def _discard(conn, fresh: str, result: Result) -> None:
    """The new database of a restore that failed before its swap: dropped, or, when it is the point's
    warm copy, given back to the point (still sealed) so that the next rollback swaps it in."""
    if result.rearm and result.taken_from:
        if warm.give_back(conn, result.point, fresh, result.taken_from):
            get_logger().info("The warm copy %s was given back to point %s, still sealed.", result.taken_from,
                              result.point.id)
        return
    _drop_quietly(conn, fresh)


def _warm_usable(conn, the_plan: Plan, result: Result) -> bool:
    """Whether the point's warm copy may be used; the summary says which path was taken and why."""
    point = the_plan.point
    if the_plan.no_warm:
        result.notes.append("restored from the dump: --no-warm")
        return False
    why = the_plan.warm_reason  # read again under the lock (plan.refresh)
    if why:
        if point.warm_database:
            get_logger().warning("Not using the warm copy: %s. Restoring from the dump instead.", why)
        result.notes.append(f"restored from the dump: {why}")
        return False
    result.notes.append(f"the warm copy was proven unchanged since it was sealed (still sealed, same OID, "
                        f"pg_database xmin and mark, no session); the dump {point.file} stays the checksummed truth")
    return True


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
