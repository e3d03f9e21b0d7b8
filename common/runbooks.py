"""The sequences several scripts share: plan → confirm → carry out → summarise."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

from . import instep, journal, notify, storage
from .cli import Context, same_database
from .errors import RestoreFailed, RollbackError, UsageError, VerifyProblems
from .files import folders
from .locks import DatabaseLock
from .pg import frameworks
from .pg.database import (
    ConnInfo,
    app_name,
    connect,
    databases_like,
    drop_database,
    maintenance_db,
    name_prefix,
    rows,
    server_version,
)
from .points import backup, catalog, drill, fill, marks, restore, snapshot, warm
from .points import cleanup as cleaning
from .points.catalog import RollbackPoint
from .points.plan import PREVIOUS_TAG
from .testing import testhooks


def restore_point(ctx: Context, info: ConnInfo, point: RollbackPoint, *, force: bool = False,
                  drop_previous: bool = False, question: Optional[str] = None) -> restore.Result:
    """Check the backup, show what will be replaced, confirm, then (services stopped, notices sent)
    restore, print the summary."""
    the_plan = restore.plan(info, point, pg_bin_dir=ctx.pg_bin_dir, force=force, pooler=ctx.pooler(info),
                            no_warm=ctx.no_warm)
    the_plan.wait = ctx.wait
    services = ctx.services()
    ctx.confirm(question or f"Restore {info.dbname} from rollback point {point.id}?",
                the_plan.describe() + services.describe())
    testhooks.checkpoint("confirmed")
    # The lock first: a second run is refused before it stops (or starts) anyone's services.
    with DatabaseLock(info, info.dbname, ctx.script) as lock, \
            notify.around(ctx, "restore", info.masked(), point.id) as end, \
            services.around(_state_after(info, f"{info.dbname} restored from {point.id}")):
        result = restore.execute(the_plan, script=ctx.script, folder=ctx.settings.backup_dir,
                                 pg_bin_dir=ctx.pg_bin_dir, drop_previous=drop_previous, reconfirm=ctx.confirm,
                                 keep_replaced=ctx.keep_replaced, lock=lock)
        end.update(result="done" if not result.unfinished else "done, with warnings", method=result.method,
                   unavailable_seconds=round(result.unavailable_seconds, 4))
    result.services = services
    rearm(ctx, the_plan, result)
    now = restore.heads_of(info)
    if now is not None:
        result.notes.append(f"migration heads now: {frameworks.describe(now)}")
    result.notes += [f"WARNING: {line}" for line in instep.out_of_step_lines(ctx, info, point)]
    show_result(ctx, result)
    return result


def _state_after(info: ConnInfo, done: str):
    def state(exc: Optional[BaseException]) -> str:
        if exc is None:
            return done
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{info.dbname} as it was before: the restore failed ({why}), and a failed restore changes nothing"
    return state


def reset_from_v2(ctx: Context, v2: ConnInfo, staging: ConnInfo, *, drop_previous: bool = False) -> restore.Result:
    """staging := a fresh copy of V2. V2 is only read, by pg_dump in one snapshot; staging is
    replaced by the never-half-done path, so a failure at any step leaves it as it was."""
    if same_database(v2, staging):
        raise UsageError("V2_DATABASE_URL and STAGING_DATABASE_URL name the same database; refusing to "
                         "reset it from itself. Nothing was changed.")
    probe = connect(v2, app=app_name(ctx.script))  # V2 is named in the confirmation: it must answer first
    try:
        v2_major, v2_version = server_version(probe)
    finally:
        probe.close()
    placeholder = RollbackPoint(id=f"fresh copy of V2 ({v2.dbname})", database=staging.dbname,
                                description=f"fresh copy of V2 {v2.masked()}")
    # The placeholder records no database properties, so staging keeps its own: they configure
    # staging (who may connect, its settings) and are not V2's data.
    the_plan = restore.plan(staging, placeholder, pg_bin_dir=ctx.pg_bin_dir, check_backup=False,
                            source_text=f"a fresh pg_dump of V2 {v2.masked()} (V2 is only read)",
                            pooler=ctx.pooler(staging))
    the_plan.wait = ctx.wait
    if v2_major > the_plan.server_major:
        raise RestoreFailed(f"V2 runs PostgreSQL {v2_version} and {staging.dbname}'s server {the_plan.server_version}: a "
                            f"copy of a newer major does not load into an older server (pg_dump's output restores into "
                            f"its own major or a newer one). Upgrade staging's server to {v2_major} first. Nothing was "
                            "changed.")
    services = ctx.services()
    ctx.confirm(f"Reset {staging.dbname} from V2?", the_plan.describe() + services.describe())
    testhooks.checkpoint("confirmed")
    folder = ctx.settings.backup_dir
    scratch = storage.ensure_dir(folder / ".tmp")
    with DatabaseLock(staging, staging.dbname, ctx.script) as lock, \
            notify.around(ctx, "reset", staging.masked(), f"fresh copy of V2 {v2.masked()}"), \
            services.around(_state_after(staging, f"{staging.dbname} reset from V2")):
        source = backup.Source.open(v2, app=app_name(ctx.script))
        try:
            from .points.streamcopy import StreamedCopy
            stream = (StreamedCopy.prepare(source, the_plan.server_major, ctx.pg_bin_dir, scratch)
                      if the_plan.can_create else None)
            if stream is not None:
                # One pass, V2 straight into the new database: no dump file to write and read back.
                ctx.log.info("Copying V2 %s (PostgreSQL %s, %d tables) ...", v2.masked(), source.version,
                             len(source.tables))
                the_plan.fill, the_plan.fill_text = stream.fill, stream.describe()
                the_plan.fill_counts = lambda: stream.target_counts
                result = restore.execute(the_plan, script=ctx.script, folder=folder, pg_bin_dir=ctx.pg_bin_dir,
                                         drop_previous=drop_previous, lock=lock, reconfirm=ctx.confirm,
                                         keep_replaced=ctx.keep_replaced)
            else:
                result = _reset_through_file(ctx, source, the_plan, scratch, drop_previous, lock)
        finally:
            source.close()
    shutil.rmtree(scratch, ignore_errors=True)
    result.services = services
    result.headline = f"Reset {staging.dbname} from V2 {v2.masked()}: it is now a fresh copy of V2."
    result.reference = "V2 as dumped"
    show_result(ctx, result)
    return result


def _reset_through_file(ctx: Context, source: backup.Source, the_plan: restore.Plan, scratch: Path,
                        drop_previous: bool, lock: DatabaseLock) -> restore.Result:
    """The reset when V2 cannot be streamed (no snapshot, no local pg_dump for its major, or an
    in-place restore): dump to a file by the first approach that works, then restore the file."""
    v2 = source.info
    ctx.log.info("Dumping V2 %s (PostgreSQL %s, %d tables) ...", v2.masked(), source.version, len(source.tables))
    dump_id = catalog.new_id(scratch, f"v2-{v2.dbname}", "reset")
    try:
        point = backup.dump_to_file(source, scratch / f"{dump_id}.dump", pg_bin_dir=ctx.pg_bin_dir)
    except backup.BackupFailed as exc:
        raise backup.BackupFailed(f"dumping V2 failed: {exc}\n{the_plan.info.dbname} was not touched (V2 is only "
                                  "read).") from None
    source.close()  # V2 is not needed while the file is restored
    try:
        point.description = f"fresh copy of V2 {v2.masked()}"
        point.created_at = storage.utc_now().isoformat(timespec="seconds")
        the_plan.point = point
        return restore.execute(the_plan, script=ctx.script, folder=ctx.settings.backup_dir,
                               pg_bin_dir=ctx.pg_bin_dir, drop_previous=drop_previous, lock=lock,
                               reconfirm=ctx.confirm, keep_replaced=ctx.keep_replaced)
    finally:
        point.path.unlink()


def rearm(ctx: Context, the_plan: restore.Plan, result: restore.Result) -> None:
    """After a rollback swapped the point's warm copy in, and staging serves: make it warm again."""
    if not result.rearm:
        return
    answered = _answers(the_plan.info)  # before the re-arm loads the server: staging's first sessions come first
    ctx.log.info("%s is back: it served the restored database after %.2f s%s.", result.target, result.back_seconds,
                 ", and a new session to it answers" if answered else "")
    keep = warm.keep_setting(ctx.settings.get("ROLLBACK_WARM_COPIES"))
    if not warm.may_stay_warm(result.point, keep):
        result.rearmed = warm.Rearmed(False, 0.0, f"not re-armed: ROLLBACK_WARM_COPIES={keep} keeps the warm copies "
                                                  f"of the {keep} newest warm point(s) only")
        return
    result.rearmed = warm.rearm(the_plan.info, result.point, the_plan.server_major, ctx.pg_bin_dir, keep)
    if not result.rearmed.ok:
        ctx.log.warning("warning: point %s is not warm again: %s", result.point.id, result.rearmed.note)


def _answers(info: ConnInfo) -> bool:
    try:
        conn = connect(info)
    except RollbackError:
        return False
    try:
        return rows(conn, "SELECT 1") == [(1,)]
    except Exception:
        return False
    finally:
        conn.close()


def warm_point(ctx: Context, info: ConnInfo, point: RollbackPoint) -> bool:
    """`rollback_manager.py warm [--file ID]`: make a dump point warm (again). Returns whether it is
    warm at the end; a copy that is there and proven sealed is left as it is."""
    keep = ctx.warm_copies
    if point.kind != catalog.DUMP or point.status != catalog.OK or point.database != info.dbname:
        raise UsageError(f"rollback point {point.id} is not an OK dump point of {info.dbname} ({point.kind}, "
                         f"{point.status}, of {point.database}): only those have warm copies. Nothing was changed.")
    if not warm.may_stay_warm(point, keep):
        raise UsageError(f"ROLLBACK_WARM_COPIES={keep} keeps the warm copies of {info.dbname}'s {keep} newest warm "
                         f"point(s), and newer points than {point.id} are warm. Nothing was changed. Raise "
                         "ROLLBACK_WARM_COPIES to keep it warm too." if keep else
                         "warm copies are off (ROLLBACK_WARM_COPIES=0). Nothing was changed.")
    conn = maintenance_db(info)
    try:
        why = warm.unusable(conn, point)
        if not why:
            note = (f"{point.warm_database} is sealed, unchanged since it was checked (same OID, xmin and mark, no "
                    "session). Nothing was changed.")
            if ctx.json:
                ctx.emit_json({"point": point.id, "warm": True, "seconds": 0.0, "note": note})
            else:
                ctx.log.info("Point %s is warm: %s", point.id, note)
            return True
        if point.warm_database:  # named but not usable: dropped only when it carries this point's mark
            ctx.log.info("Point %s: %s; making a new warm copy.", point.id, why)
            warm.drop(conn, point)
            warm.record(point, None)
            catalog.save(point)
        major = server_version(conn)[0]
    finally:
        conn.close()
    done = warm.rearm(info, point, major, ctx.pg_bin_dir, keep)
    if ctx.json:
        ctx.emit_json({"point": point.id, "warm": done.ok, "seconds": round(done.seconds, 3), "note": done.note})
    elif done.ok:
        ctx.log.info("Point %s is warm again after %.1f s: %s.", point.id, done.seconds, done.note)
    else:
        raise RollbackError(f"point {point.id} is not warm: {done.note}")
    return done.ok


def drill_points(ctx: Context, info: ConnInfo, chosen: Optional[List[RollbackPoint]]) -> int:
    """`rollback_manager.py drill`: each point restored beside staging, proven, timed, dropped.
    chosen None: every OK point of staging, the longest undrilled first. Exit 1 when one failed."""
    points = scan(ctx, info)
    if chosen is None:
        chosen = drill.order_for_every(points, info.dbname)
        if not chosen:
            raise UsageError(f"no OK rollback point of {info.dbname} in {ctx.settings.backup_dir}. Nothing was changed.")
    for point in chosen:
        catalog.quick_check(point, scan_checker(ctx, info))
        if point.status != catalog.OK:
            raise UsageError(f"rollback point {point.id} is {point.status} ({point.problem}): it cannot be drilled. "
                             "Nothing was changed.")
    results = []
    for n, point in enumerate(chosen, 1):
        if len(chosen) > 1:
            ctx.log.info("[%d/%d] %s", n, len(chosen), point.id)
        done = drill.run(info, point, ctx.settings.backup_dir, ctx.pg_bin_dir)
        results.append(done)
        (ctx.log.info if done.ok else ctx.log.error)("%s", done.line())
        if not done.ok:
            notify.send(ctx, "drill", "failed", point=point.id, seconds=done.seconds, error=done.error)
    if ctx.json:
        ctx.emit_json({"drills": [dict(d.record(), point=d.point.id, objective_seconds=drill.DATABASE_OBJECTIVE,
                                       checked=d.checked or None) for d in results]})
    else:
        ok = sum(d.ok for d in results)
        left = [d.left_behind for d in results if d.left_behind]
        ctx.log.info("Drills: %d OK, %d failed; the database %s was not touched; %s.", ok, len(results) - ok, info.dbname,
                     f"scratch database(s) NOT dropped: {', '.join(left)} (the next drill removes them)" if left
                     else "every scratch database was dropped")
    return 0 if all(d.ok for d in results) else 1


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
    """The catalog with full statuses: snapshot databases looked up on the server, and each OK dump
    checked for a pg_restore on this machine that can restore it into its server (DESIGN §4: OK
    means restorable); the tools found are shown by list and info."""
    points = catalog.scan(ctx.settings.backup_dir, scan_checker(ctx, info))
    for point in points:
        check_restorable(ctx, point)
    return points


def check_restorable(ctx: Context, point: RollbackPoint) -> None:
    """An OK dump point stays OK only when a pg_restore here can restore it into its server."""
    if point.status != catalog.OK or point.kind != catalog.DUMP:
        return
    try:
        point.restore_with = fill.restorer(point, _server_major(point), ctx.pg_bin_dir)
    except RollbackError as exc:
        point.status = catalog.UNRESTORABLE
        point.problem = f"nothing on this machine can restore it: {exc}"


def server_inventory(ctx: Context, info: Optional[ConnInfo], points: List[RollbackPoint]) -> dict:
    """What the toolkit holds on the server and on disk, with sizes: dumps, warm copies, snapshots and
    replaced (`__pre_rollback_`) databases; the server's part is unknown while it cannot be reached."""
    dumps = sum(p.size_bytes for p in points if p.kind == catalog.DUMP and p.status != catalog.INVALID)
    found: dict = {"dump_bytes": dumps, "reachable": None, "replaced": [], "warm_bytes": None, "snapshot_bytes": None}
    if info is None:
        return found
    try:
        conn = maintenance_db(info)
    except RollbackError as exc:
        found.update(reachable=False, error=str(exc))
        return found
    try:
        sizes = dict(rows(conn, """SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT')
                                          THEN pg_database_size(oid) ELSE 0 END FROM pg_database"""))
        found["reachable"] = True
        found["replaced"] = [{"database": name, "bytes": sizes.get(name, 0)}
                             for name in reversed(databases_like(conn, name_prefix(info.dbname, PREVIOUS_TAG)))]
        found["warm_bytes"] = sum(sizes.get(p.warm_database, 0) for p in points if p.warm_database)
        found["snapshot_bytes"] = sum(sizes.get(p.snapshot_database, 0) for p in points if p.snapshot_database)
    finally:
        conn.close()
    found["total_bytes"] = dumps + found["warm_bytes"] + found["snapshot_bytes"] + sum(r["bytes"] for r in found["replaced"])
    return found


def _server_major(point: RollbackPoint) -> int:
    try:
        return int(point.server_version.split(".")[0])
    except ValueError:
        return 0


def reference_point(ctx: Context, info: ConnInfo, ref: Optional[str] = None) -> tuple:
    """The point `verify` compares a database with, and why: --file, else the one it was last
    restored from (the restore journal), else the newest OK point; (None, why not) when none."""
    if ref:
        point = catalog.resolve(ctx.settings.backup_dir, ref)
        return point, "chosen with --file"
    last = journal.last(ctx.settings.backup_dir, info.dbname)
    points = scan(ctx, info)
    if last is not None:
        if last.get("point") is None:
            return None, (f"{info.dbname} was last reset ({last.get('source')}) at {last['at']}; pass --file ID to "
                          "compare it with a rollback point")
        found = next((p for p in points if p.id == last["point"]), None)
        if found is not None:
            return found, f"the point {info.dbname} was last restored from, at {last['at']}"
    newest = catalog.newest_ok(points, info.dbname)
    if newest is None:
        return None, "no OK rollback point of this database"
    return newest, (f"the newest point: {info.dbname} was never restored by this toolkit" if last is None else
                    f"the newest point: the one last restored from ({last['point']}) is gone")


def verify_database(ctx: Context, target: ConnInfo, ref: Optional[str], quick: bool, strict: bool) -> None:
    """Health, and every difference from the point the database was restored from (VerifyProblems,
    exit 4, on a problem; with strict, any difference is one)."""
    from .points import health
    point, reference = reference_point(ctx, target, ref)
    report = health.check(target, point, reference, quick=quick)
    report.code_out_of_step = instep.out_of_step_lines(ctx, target, point)
    problems = report.problems(strict)
    # The documents' key metrics against their alert thresholds: reported, not counted as problems
    # (a busy machine is not a broken database); the release rollback acts on them.
    from .pg import metrics  # psutil: only where health is measured
    observed = metrics.sample(target, metrics.thresholds(ctx.settings), window=1.0)
    if ctx.json:
        ctx.emit_json({**report.to_json(strict), "metrics": observed.to_json()})
    else:
        for line in report.lines(strict):
            ctx.log.info("%s", line)
        ctx.log.info("metrics:        %s", observed.line())
    if problems:
        raise VerifyProblems(f"{len(problems)} problem(s) found in {target.dbname}")


def require_database(info: ConnInfo) -> None:
    """A rollback needs its target to exist: a typo in the URL must not turn into a new database."""
    conn = maintenance_db(info)
    try:
        exists = bool(rows(conn, "SELECT 1 FROM pg_database WHERE datname = %s", (info.dbname,)))
    finally:
        conn.close()
    if not exists:
        raise UsageError(f"database {info.dbname!r} does not exist on the server of {info.masked()}: is "
                         "STAGING_DATABASE_URL right? To create it as a fresh copy of V2, run: python3 reset_staging.py. "
                         "Nothing was changed.")


def newest_point(ctx: Context, info: ConnInfo) -> Optional[RollbackPoint]:
    return catalog.newest_ok(scan(ctx, info), info.dbname)


def delete_point(ctx: Context, point: RollbackPoint, info: Optional[ConnInfo]) -> None:
    """Remove a rollback point: its files, and for a snapshot its database (under the lock)."""
    dropped = False
    if point.kind == catalog.SNAPSHOT:
        if info is None:
            raise UsageError("deleting a snapshot needs STAGING_DATABASE_URL (its database lives there)")
        with DatabaseLock(info, point.database, ctx.script) as lock:
            dropped = snapshot.drop(lock.conn, point)
            catalog.remove_files(point)
    elif point.warm_database and info is not None:
        with DatabaseLock(info, point.database, ctx.script) as lock:
            catalog.remove_files(point)  # the sidecar first: a kill in between leaves an orphan the next run drops
            dropped = warm.drop(lock.conn, point)
    else:
        catalog.remove_files(point)
        if point.warm_database:
            ctx.log.warning("its warm copy %s stays on the server (no STAGING_DATABASE_URL to reach it); the next "
                            "rollback point of %s removes it", point.warm_database, point.database)
    gone = (point.snapshot_database or point.warm_database) if dropped else None
    ctx.log.info("Deleted rollback point %s%s.", point.id, f" and database {gone}" if gone else "")


def drop_orphan(ctx: Context, info: ConnInfo, name: str) -> None:
    """Drop a snapshot database that no sidecar describes (under the target's lock)."""
    with DatabaseLock(info, info.dbname, ctx.script) as lock:
        drop_database(lock.conn, name)
    marks.forget(ctx.settings.backup_dir, name)
    ctx.log.info("Dropped orphan snapshot database %s.", name)


def cleanup(ctx: Context, info: Optional[ConnInfo], older_than: Optional[float], keep: Optional[int],
            dry_run: bool) -> None:
    """Old rollback points (files) and old `__pre_rollback_` databases of the target; the newest
    OK point of every database is always kept."""
    if older_than is None and keep is None:
        raise UsageError("say what to remove: --older-than DAYS and/or --keep N. Nothing was changed.")
    if (older_than is not None and older_than < 0) or (keep is not None and keep < 1):
        raise UsageError("DAYS must be 0 or more and --keep at least 1. Nothing was changed.")
    points = scan(ctx, info)
    the_plan = cleaning.plan_points(points, older_than, keep)
    cleaning.plan_releases(the_plan, releases(ctx, points), older_than)
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
        if not the_plan.points and not the_plan.databases and not the_plan.releases:
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
    doomed = folders.old_backups(folders.list_backups(parent, prefix, metadata), days)
    # The parts of the newest OK release stay with it (rollback_manager.py cleanup removes a release whole).
    newest_ok = next((r for r in releases(ctx, catalog.scan(ctx.settings.backup_dir)) if r.status == catalog.OK), None)
    if newest_ok is not None:
        parts = {str(Path(newest_ok.parts[k]["path"]).resolve()) for k in ("config", "code")}
        doomed = [b for b in doomed if str(Path(b.path).resolve()) not in parts]
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


def releases(ctx: Context, points: List[RollbackPoint]) -> list:
    """The release rollback points, each part checked to lie in its configured backup folder."""
    s = ctx.settings
    from .release import records  # the configuration files' parsers (YAML): only where releases are read
    return records.scan(s.backup_dir, points, {"config": s.path("CONFIG_BACKUP_DIR"), "code": s.path("CODE_BACKUP_DIR")})
