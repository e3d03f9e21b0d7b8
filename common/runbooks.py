"""The sequences several scripts share: plan → confirm → carry out → summarise."""
from __future__ import annotations

import shutil
from typing import List, Optional

from . import backup, catalog, files, restore, snapshot, warm
from . import cleanup as cleaning
from .catalog import RollbackPoint
from .cli import Context, same_database
from .database import ConnInfo, app_name, drop_database
from .errors import UsageError
from .locks import DatabaseLock


def restore_point(ctx: Context, info: ConnInfo, point: RollbackPoint, *, force: bool = False,
                  drop_previous: bool = False, question: Optional[str] = None) -> restore.Result:
    """Check the backup, show what will be replaced, confirm, restore, print the summary."""
    the_plan = restore.plan(info, point, pg_bin_dir=ctx.pg_bin_dir, force=force, pooler=ctx.pooler(info))
    the_plan.wait, the_plan.no_warm = ctx.wait, ctx.no_warm
    ctx.confirm(question or f"Restore {info.dbname} from rollback point {point.id}?", the_plan.describe())
    result = restore.execute(the_plan, script=ctx.script, folder=ctx.settings.backup_dir,
                             pg_bin_dir=ctx.pg_bin_dir, drop_previous=drop_previous)
    show_result(ctx, result)
    return result


def reset_from_v2(ctx: Context, v2: ConnInfo, staging: ConnInfo, *, drop_previous: bool = False) -> restore.Result:
    """staging := a fresh copy of V2. V2 is only read, by pg_dump in one snapshot; staging is
    replaced by the never-half-done path, so a failure at any step leaves it as it was."""
    if same_database(v2, staging):
        raise UsageError("V2_DATABASE_URL and STAGING_DATABASE_URL name the same database; refusing to "
                         "reset it from itself. Nothing was changed.")
    placeholder = RollbackPoint(id=f"fresh copy of V2 ({v2.dbname})", database=staging.dbname,
                                description=f"fresh copy of V2 {v2.masked()}")
    # The placeholder records no database properties, so staging keeps its own: they configure
    # staging (who may connect, its settings) and are not V2's data.
    the_plan = restore.plan(staging, placeholder, pg_bin_dir=ctx.pg_bin_dir, check_backup=False,
                            source_text=f"a fresh pg_dump of V2 {v2.masked()} (V2 is only read)",
                            pooler=ctx.pooler(staging))
    the_plan.wait = ctx.wait
    ctx.confirm(f"Reset {staging.dbname} from V2?", the_plan.describe())
    folder = ctx.settings.backup_dir
    scratch = catalog.ensure_dir(folder / ".tmp")
    with DatabaseLock(staging, staging.dbname, ctx.script) as lock:
        source = backup.Source.open(v2, app=app_name(ctx.script))
        try:
            ctx.log.info("Dumping V2 %s (PostgreSQL %s, %d tables) ...", v2.masked(), source.version, len(source.tables))
            dump_id = catalog.new_id(scratch, f"v2-{v2.dbname}", "reset")
            point = backup.dump_to_file(source, scratch / f"{dump_id}.dump", pg_bin_dir=ctx.pg_bin_dir)
        finally:
            source.close()
        try:
            point.description = f"fresh copy of V2 {v2.masked()}"
            point.created_at = catalog.utc_now().isoformat(timespec="seconds")
            the_plan.point = point
            result = restore.execute(the_plan, script=ctx.script, folder=folder, pg_bin_dir=ctx.pg_bin_dir,
                                     drop_previous=drop_previous, lock=lock)
        finally:
            point.path.unlink()
    shutil.rmtree(scratch, ignore_errors=True)
    result.headline = f"Reset {staging.dbname} from V2 {v2.masked()}: it is now a fresh copy of V2."
    result.reference = "V2 as dumped"
    show_result(ctx, result)
    return result


def show_result(ctx: Context, result: restore.Result) -> None:
    if ctx.json:
        ctx.emit_json(result.to_json())
    else:
        for line in result.summary_lines():
            ctx.log.info("%s", line)


def scan_checker(ctx: Context, info: Optional[ConnInfo]):
    """Whether a snapshot database exists, asked of the server once and only when needed."""
    if info is None:
        return None
    cache: list = []

    def exists(name: str) -> Optional[bool]:
        if not cache:
            cache.append(snapshot.exists_checker(info))
        return cache[0](name)
    return exists


def scan(ctx: Context, info: Optional[ConnInfo]) -> List[RollbackPoint]:
    """The catalog with full statuses (snapshot databases looked up on the server)."""
    return catalog.scan(ctx.settings.backup_dir, scan_checker(ctx, info))


def newest_point(ctx: Context, info: ConnInfo) -> Optional[RollbackPoint]:
    return catalog.newest_ok(scan(ctx, info), info.dbname)


def delete_point(ctx: Context, point: RollbackPoint, info: Optional[ConnInfo]) -> None:
    """Remove a rollback point: its files, and for a snapshot its database (under the lock)."""
    if point.kind == catalog.SNAPSHOT:
        if info is None:
            raise UsageError("deleting a snapshot needs STAGING_DATABASE_URL (its database lives there)")
        with DatabaseLock(info, point.database, ctx.script) as lock:
            snapshot.drop(lock.conn, point)
            catalog.remove_files(point)
    elif point.warm_database and info is not None:
        with DatabaseLock(info, point.database, ctx.script) as lock:
            catalog.remove_files(point)  # the sidecar first: a kill in between leaves an orphan the next run drops
            warm.drop(lock.conn, point)
    else:
        catalog.remove_files(point)
        if point.warm_database:
            ctx.log.warning("its warm copy %s stays on the server (no STAGING_DATABASE_URL to reach it); the next "
                            "rollback point of %s removes it", point.warm_database, point.database)
    gone = point.snapshot_database or (point.warm_database if info is not None else None)
    ctx.log.info("Deleted rollback point %s%s.", point.id, f" and database {gone}" if gone else "")


def drop_orphan(ctx: Context, info: ConnInfo, name: str) -> None:
    """Drop a snapshot database that no sidecar describes (under the target's lock)."""
    with DatabaseLock(info, info.dbname, ctx.script) as lock:
        drop_database(lock.conn, name)
    ctx.log.info("Dropped orphan snapshot database %s.", name)


def cleanup(ctx: Context, info: Optional[ConnInfo], older_than: Optional[float], keep: Optional[int],
            dry_run: bool) -> None:
    """Old rollback points (files) and old `__pre_rollback_` databases of the target; the newest
    OK point of every database is always kept."""
    if older_than is None and keep is None:
        raise UsageError("say what to remove: --older-than DAYS and/or --keep N. Nothing was changed.")
    if (older_than is not None and older_than < 0) or (keep is not None and keep < 1):
        raise UsageError("DAYS must be 0 or more and --keep at least 1. Nothing was changed.")
    the_plan = cleaning.plan_points(scan(ctx, info), older_than, keep)
    lock = None
    try:
        if info is not None:
            lock = DatabaseLock(info, info.dbname, ctx.script).__enter__()
            the_plan.databases = cleaning.kept_databases(lock.conn, info.dbname, older_than)
        if dry_run:
            ctx.log.info("Cleanup (dry run): would remove")
            for line in the_plan.lines():
                ctx.log.info("  %s", line)
            return
        if not the_plan.points and not the_plan.databases:
            ctx.log.info("Cleanup: nothing to remove (%d rollback points kept).", len(the_plan.kept))
            return
        ctx.confirm("Remove these?", the_plan.lines())
        done = cleaning.remove(the_plan, lock.conn if lock else None)
        ctx.log.info("Removed %d item(s):", len(done))
        for line in done:
            ctx.log.info("  %s", line)
        ctx.log.info("Kept %d rollback point(s).", len(the_plan.kept))
    finally:
        if lock is not None:
            lock.release()


def cleanup_backup_folders(ctx: Context, parent, prefix: str, metadata: str, days: float, dry_run: bool,
                           what: str) -> None:
    """Cleanup of code and config backups older than `days` (never the newest): list, confirm, remove."""
    doomed = files.old_backups(files.list_backups(parent, prefix, metadata), days)
    lines = [f"{b.path} ({b.metadata.get('created_at', '?')})" for b in doomed]
    if dry_run or not doomed:
        ctx.log.info("%s %d %s(s)%s", "Would remove" if dry_run else "Nothing to remove:", len(doomed), what,
                     ":" if doomed else ".")
        for line in lines:
            ctx.log.info("  %s", line)
        return
    ctx.confirm(f"Remove {len(doomed)} {what}(s)?", lines)
    for b in doomed:
        shutil.rmtree(b.path)
    ctx.log.info("Removed %d %s(s); the newest backup is always kept.", len(doomed), what)
