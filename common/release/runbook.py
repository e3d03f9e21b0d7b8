"""The release rollback's runbooks (DESIGN §10): a release point of configuration, code and database
under one lock, and its rollback in the documents' order (configuration, code, database), each part
backed up first and verified after, then the health of staging."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

from .. import journal, notify, runbooks, storage
from ..cli import Context
from ..errors import RollbackError, UsageError
from ..files import configfiles, folders
from ..pg import metrics
from ..pg.database import ConnInfo
from ..points import backup, restore
from ..testing import testhooks
from . import records


def release_lock(ctx: Context) -> folders.FolderLock:
    """One release operation at a time (create --all, restore --all): each step also takes its own
    lock, but two release rollbacks interleaved between steps could leave configuration from one
    release beside code from another."""
    return folders.FolderLock(ctx.settings.backup_dir, ctx.script, name=".release.lock",
                            what=f"release operation on {ctx.settings.backup_dir}")


def create_release(ctx: Context, staging: ConnInfo, description: str) -> records.Release:
    """A release rollback point: configuration, code and database backups under one id. The
    release sidecar is written last; when a part fails, none is, and the output says what was made."""
    with release_lock(ctx):
        return _create_release(ctx, staging, description)


def _create_release(ctx: Context, staging: ConnInfo, description: str) -> records.Release:
    from ..files import coderepo  # GitPython: imported only where code is handled (it needs a git executable)
    s = ctx.settings
    config_dir, env_file, config_backups = s.path("CONFIG_DIR"), s.path("ENV_FILE"), s.path("CONFIG_BACKUP_DIR")
    repo_path, code_backups = s.path("REPO_PATH"), s.path("CODE_BACKUP_DIR")
    made: List[str] = []
    step = "configuration"
    try:
        if not config_dir.is_dir():
            raise UsageError(f"CONFIG_DIR {config_dir} does not exist")
        with folders.FolderLock(config_backups, ctx.script):
            config_path = configfiles.backup(config_dir, env_file, config_backups, reason=f"release: {description}")
        made.append(f"configuration backup {config_path}")
        ctx.log.info("1/3 configuration backup: %s", config_path)
        step = "code"
        with folders.FolderLock(code_backups, ctx.script):
            code_path = coderepo.backup(coderepo.open_repo(repo_path), code_backups, reason=f"release: {description}")
        made.append(f"code backup {code_path}")
        ctx.log.info("2/3 code backup: %s", code_path)
        step = "database"
        point = backup.create_point(staging, s.backup_dir, ctx.script, description,
                                    code_commit=ctx.code_commit(), pg_bin_dir=ctx.pg_bin_dir,
                                    confirm=ctx.confirm,
                                    warm_copies=ctx.warm_copies)
        made.append(f"database rollback point {point.id}")
        ctx.log.info("3/3 database rollback point: %s%s", point.id, " (warm)" if point.warm_database else "")
    except RollbackError as exc:
        raise records.ReleaseFailed(
            f"the {step} part failed ({exc}); no release rollback point was recorded. Made before the failure, "
            f"and kept as ordinary backups: {'; '.join(made) or 'nothing'}.") from None
    made_release = records.record(s.backup_dir, description, records.parts_of(config_path, code_path, point))
    if ctx.json:
        ctx.emit_json(made_release.summary())
    else:
        ctx.log.info("Release rollback point created: %s", made_release.id)
        for line in made_release.lines()[1:]:
            ctx.log.info("%s", line)
    return made_release


def restore_release(ctx: Context, staging: ConnInfo, ref: Optional[str], monitor_seconds: float = 0.0) -> int:
    """Configuration, then code, then database, each verified, stopping at the first failure; then
    the documents' health metrics. Returns the exit code (1 a step failed, 4 health not OK). A
    second release operation is refused before anything is checked or changed."""
    with release_lock(ctx):
        return _restore_release(ctx, staging, ref, monitor_seconds)


def _restore_release(ctx: Context, staging: ConnInfo, ref: Optional[str], monitor_seconds: float = 0.0) -> int:
    from ..files import coderepo  # GitPython: imported only where code is handled (it needs a git executable)
    s = ctx.settings
    config_dir, env_file, config_backups = s.path("CONFIG_DIR"), s.path("ENV_FILE"), s.path("CONFIG_BACKUP_DIR")
    repo_path, code_backups = s.path("REPO_PATH"), s.path("CODE_BACKUP_DIR")
    points = runbooks.scan(ctx, staging)
    chosen = records.resolve(runbooks.releases(ctx, points), ref)
    parts = chosen.parts
    # Everything is checked before anything changes: both backups against their checksums, the
    # database point and its restore plan (tools, properties, PgBouncer).
    config_path, code_path = Path(parts["config"]["path"]), Path(parts["code"]["path"])
    config_meta = configfiles.load_backup(config_path)
    code_meta = coderepo.load_backup(code_path)
    point = next(p for p in points if p.id == parts["database"]["id"])
    the_plan = restore.plan(staging, point, pg_bin_dir=ctx.pg_bin_dir, pooler=ctx.pooler(staging), no_warm=ctx.no_warm)
    the_plan.wait = ctx.wait
    drift = configfiles.drift(config_meta, config_dir, env_file)
    services = ctx.services()
    ctx.confirm(f"Roll the whole release back to {chosen.id}?", [
        f"release {chosen.id} ({chosen.description or '-'}, created {chosen.created_at}), in this order:",
        f"1. configuration: {config_dir} and {env_file} := {config_path} ({len(config_meta['files'])} files; "
        f"{len(drift.changed)} changed since, {len(drift.added)} added since (removed), {len(drift.removed)} "
        "removed since (put back))",
        f"2. code: {repo_path} := {code_path} (commit {(code_meta['commit'] or '-')[:12]} on "
        f"{code_meta['branch'] or 'detached HEAD'}, {len(code_meta['dirty_files'])} uncommitted file(s))",
        "3. database:"] + [f"   {line}" for line in the_plan.describe()] +
        ["each step is backed up first and verified after; the first that fails stops the rest"] +
        services.describe())
    progress = records.Progress(s.backup_dir, chosen.id)

    def config_step() -> str:
        with folders.FolderLock(config_backups, ctx.script):
            auto = configfiles.backup(config_dir, env_file, config_backups, reason=f"automatic before release {chosen.id}")
            done = configfiles.restore(config_path, config_meta, config_dir, env_file,
                                       present=json.loads((auto / configfiles.MANIFEST).read_text()))
        journal.record(config_backups, "config", config_path.name, f"release {chosen.id}")
        left = configfiles.drift(config_meta, config_dir, env_file)
        if left.added or left.removed or left.changed:
            raise RollbackError(f"configuration differs from the backup after the restore: {left}")
        return (f"{len(done.written)} file(s) written, {len(done.removed)} removed; verified against the backup; "
                f"the configuration as it was is in {auto}")

    def code_step() -> str:
        taken = []
        before = coderepo.capture(coderepo.open_repo(repo_path))
        with folders.FolderLock(code_backups, ctx.script):
            def backup_first(at_risk):
                taken.append(coderepo.backup(coderepo.open_repo(repo_path), code_backups, include_ignored=at_risk,
                                             reason=f"automatic before release {chosen.id}"))
                ctx.log.info("  automatic backup of the code as it was: %s", taken[-1])
            coderepo.restore(repo_path, code_path, code_meta, backup_first=backup_first)
        journal.record(code_backups, "code", code_path.name, f"release {chosen.id}")
        repo = coderepo.open_repo(repo_path)
        state = coderepo.capture(repo)
        broken = coderepo.fsck(repo)
        if state.commit != code_meta["commit"] or state.branch != code_meta["branch"] or broken:
            raise RollbackError(f"the repository is not as backed up after the restore (HEAD {state.commit}, "
                                f"branch {state.branch}, fsck: {broken[:2]})")
        text = f"commit {(state.commit or '-')[:12]} on {state.branch or 'detached HEAD'}; verified"
        if taken:
            text += f"; the code as it was is in {taken[-1]}"
        left = coderepo.left_behind(repo, before.commit)
        if left:
            text += (f"; commit {left[:12]} (HEAD before) is on no branch now: `git -C {repo_path} branch "
                     f"rescued-{left[:8]} {left}` brings it back")
        return text

    db_result: List[restore.Result] = []

    def database_step() -> str:
        result = restore.execute(the_plan, script=ctx.script, folder=s.backup_dir, pg_bin_dir=ctx.pg_bin_dir,
                                 reconfirm=ctx.confirm, keep_replaced=ctx.keep_replaced)
        db_result.append(result)
        for line in result.unfinished:
            ctx.log.warning("warning: %s IS restored, but this did not finish: %s", staging.dbname, line)
        return (f"{result.method}; verification: {result.verification()}; "
                f"unavailable {result.unavailable_seconds * 1000:.0f} ms" +
                "".join(f"; WARNING, not finished: {u}" for u in result.unfinished))

    ran: List[records.Step] = []

    def on_step(step: records.Step) -> None:
        ran.append(step)
        progress.record(step)
        ctx.log.info("%s", step.line())
        testhooks.checkpoint(f"release-{step.component}-done")

    ctx.log.info("Rolling back release %s: configuration -> code -> database", chosen.id)

    def state(exc) -> str:
        done = [st.component for st in ran if st.ok]
        stopped = next((st.component for st in ran if st.ok is False), None)
        if exc is None and stopped is None:
            return f"release {chosen.id} rolled back (configuration, code and database)"
        return (f"a partly rolled-back release: {', '.join(done) or 'no step'} done, "
                f"{stopped or 'a step'} failed (it changed nothing), the rest not run")

    with notify.around(ctx, "restore --all", staging.masked(), chosen.id) as end, services.around(state):
        steps = records.run_steps({"config": config_step, "code": code_step, "database": database_step}, on_step)
        stopped_at = next((st.component for st in ran if st.ok is False), None)
        end["result"] = "done" if stopped_at is None else f"failed at the {stopped_at} step"
    failed = next((st for st in steps if st.ok is False), None)
    health = None
    if failed is None:
        progress.finish()
        limits = metrics.thresholds(s)
        ctx.log.info("Health of %s after the rollback (thresholds: %s):", staging.dbname,
                     ", ".join(f"{k} {v:g}" for k, v in limits.items()))
        if monitor_seconds > 0:
            health = metrics.monitor(staging, limits, monitor_seconds, lambda h: ctx.log.info("  %s", h.line()))
        else:
            health = metrics.sample(staging, limits)
        ctx.log.info("  %s", health.line())
    else:
        progress.finish(failed=failed.component)
    rearmed = None
    if db_result and db_result[0].rearm:  # after every step and the health check: nobody waits for it
        runbooks.rearm(ctx, the_plan, db_result[0])
        rearmed = db_result[0].rearmed
        ctx.log.info("  warm again: %s", db_result[0].rearm_text())
    if ctx.json:
        ctx.emit_json({"release": chosen.id, "steps": [st.to_json() for st in steps],
                       "health": health.to_json() if health else None,
                       "warm_again": None if rearmed is None else rearmed.ok,
                       "rearm": None if rearmed is None else rearmed.note, "services": services.to_json()})
    else:
        ctx.log.info("Release %s: %s", chosen.id, "rolled back" if failed is None else f"STOPPED at {failed.component}")
        for st in steps:
            ctx.log.info("%s", st.line())
        for line in services.lines():
            ctx.log.info("  %s", line)
    if failed is not None:
        ctx.log.error("error: the %s step failed; the steps before it are done, those after it were not run. "
                      "The failed step itself changed nothing.", failed.component)
        return 1
    return 0 if health.ok else 4


def drill_release(ctx: Context, staging: ConnInfo, ref: Optional[str]) -> int:
    """`rollback_manager.py drill --all [--file RELEASE_ID | --latest]`: configuration and code restored
    into scratch folders and checked against their backups' checksums, the database drilled into a
    scratch database (common.points.drill); each component timed against its objective. Nothing
    the release describes is touched; the scratch folders and database are removed on every way out."""
    with release_lock(ctx):
        return _drill_release(ctx, staging, ref)


def _drill_release(ctx: Context, staging: ConnInfo, ref: Optional[str]) -> int:
    from ..files import coderepo
    from ..points import catalog, drill
    points = runbooks.scan(ctx, staging)
    chosen = records.resolve(runbooks.releases(ctx, points), ref)
    parts = chosen.parts
    config_path, code_path = Path(parts["config"]["path"]), Path(parts["code"]["path"])
    point = next((p for p in points if p.id == parts["database"]["id"]), None)
    if point is None or point.status != catalog.OK:
        raise UsageError(f"release {chosen.id}'s database point {parts['database']['id']} is "
                         f"{'missing' if point is None else point.status}: it cannot be drilled. Nothing was changed.")
    folder = storage.ensure_dir(ctx.settings.backup_dir)
    for stale in folder.glob(".drill-*"):  # a killed release drill's (they run one at a time): restored secrets
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=".drill-", dir=folder))
    ctx.log.info("Drilling release %s: configuration and code into %s, the database beside %s (nothing the "
                 "release describes is touched)", chosen.id, scratch, staging.dbname)

    def config_step() -> str:
        meta = configfiles.load_backup(config_path)  # every file against the manifest's sha256
        env_entry = next((e for e in meta["entries"] if e.area == "env"), None)  # named as ENV_FILE was
        env = storage.ensure_dir(scratch / "env") / Path(env_entry.path).name if env_entry else None
        done = configfiles.restore(config_path, meta, storage.ensure_dir(scratch / "config"), env)
        left = configfiles.drift(meta, scratch / "config", env)
        if left.added or left.removed or left.changed:
            raise RollbackError(f"the restored configuration differs from the backup: {left}")
        return f"{len(done.written)} file(s) restored into a scratch folder, each matching the backup's sha256"

    def code_step() -> str:
        meta = coderepo.load_backup(code_path)
        coderepo.restore(scratch / "repo", code_path, meta)
        repo = coderepo.open_repo(scratch / "repo")
        found, broken = coderepo.drift(repo, code_path, meta), coderepo.fsck(repo)
        if found["head"] or found["added"] or found["removed"] or found["changed"] or broken:
            raise RollbackError(f"the restored repository differs from the backup: {found['head'] or ''} "
                                f"{found['added'][:3]} {found['removed'][:3]} {found['changed'][:3]} {broken[:2]}")
        return (f"commit {(meta['commit'] or '-')[:12]} on {meta['branch'] or 'detached HEAD'} rebuilt in a scratch "
                "folder; every file matches the backup's archive; git fsck clean")

    def database_step() -> str:
        done = drill.run(staging, point, ctx.settings.backup_dir, ctx.pg_bin_dir)
        if not done.ok:
            raise RollbackError(done.error)
        return f"{done.checked}; restored with {done.tools}"

    try:
        steps = records.run_steps({"config": config_step, "code": code_step, "database": database_step},
                                  lambda st: ctx.log.info("%s", st.line()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if scratch.exists():
        ctx.log.warning("warning: the scratch folder %s could not be removed entirely; remove it by hand (it holds "
                        "the restored configuration)", scratch)
    failed = next((st for st in steps if st.ok is False), None)
    if failed is not None:
        notify.send(ctx, "drill --all", "failed", target=staging.masked(), point=chosen.id,
                    seconds=round(sum(st.seconds for st in steps), 3), error=f"{failed.component}: {failed.error}")
    if ctx.json:
        ctx.emit_json({"release": chosen.id, "drill": True, "ok": failed is None,
                       "steps": [st.to_json() for st in steps]})
    else:
        ctx.log.info("Drill of release %s: %s; nothing the release describes was touched.", chosen.id,
                     "OK" if failed is None else f"FAILED at {failed.component}")
    return 0 if failed is None else 1
