#!/usr/bin/env python3
"""Database rollback for the DB_* target (or STAGING_DATABASE_URL when DB_NAME is unset).

    python3 database_rollback.py backup
    python3 database_rollback.py migrate [TARGET]
    python3 database_rollback.py status [--json]
    python3 database_rollback.py rollback 001_initial_schema
    python3 database_rollback.py restore /path/to/backup.dump
    python3 database_rollback.py verify [--json] [--strict]
    python3 database_rollback.py cleanup 30
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli, runbooks  # noqa: E402
from common.errors import RollbackError, UsageError  # noqa: E402
from common.locks import DatabaseLock  # noqa: E402
from common.pg import migrations  # noqa: E402
from common.pg.database import connect  # noqa: E402
from common.points import backup, catalog  # noqa: E402
from common.testing import testhooks  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli.command_parser("database_rollback.py", __doc__)
    p = sub.add_parser("backup", help="make a rollback point of the target database")
    p.add_argument("description", nargs="?", default="")
    p.add_argument("--method", choices=backup.METHODS)
    p.add_argument("--compress", metavar="SPEC")
    cli.common_flags(p, destructive=False, machine=True, db_target=True)
    cli.warm_flag(p, making=True)
    cli.yes_flag(p)
    p = sub.add_parser("migrate", help="apply pending SQL migrations in order (up to TARGET)")
    p.add_argument("target", nargs="?", help="version (001) or name (001_initial_schema) to stop at")
    p.add_argument("--migrations-dir", metavar="DIR", help="default: $MIGRATIONS_DIR")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    cli.common_flags(p, destructive=False, db_target=True)
    cli.warm_flag(p, making=True)
    p = sub.add_parser("status", help="applied, pending and edited migrations")
    p.add_argument("--migrations-dir", metavar="DIR")
    cli.common_flags(p, destructive=False, machine=True, db_target=True)
    p = sub.add_parser("rollback", help="revert every migration applied after TARGET, newest first")
    p.add_argument("target", help="version (001) or name (001_initial_schema) to go back to")
    p.add_argument("--migrations-dir", metavar="DIR")
    cli.common_flags(p, db_target=True)
    cli.warm_flag(p, making=True)
    p = sub.add_parser("restore", help="restore the target from a rollback point (never half-done)")
    p.add_argument("path", help="the .dump file (with its .json sidecar beside it) or a rollback point id")
    p.add_argument("--force", action="store_true", help="allow a backup of another database")
    p.add_argument("--drop-previous", action="store_true", help="do not keep the replaced database")
    cli.common_flags(p, machine=True, db_target=True)
    cli.warm_flag(p, making=False)
    p = sub.add_parser("verify", help="health, and drift from the point it was restored from (exit 4 on problems)")
    p.add_argument("--strict", action="store_true",
                   help="count any difference from the rollback point as a problem (exit 4)")
    p.add_argument("--file", metavar="ID", help="compare with this rollback point instead")
    p.add_argument("--quick", action="store_true", help="compare tables and row counts only")
    cli.common_flags(p, destructive=False, machine=True, db_target=True)
    p = cli.cleanup_command(sub, "remove rollback points older than DAYS (the newest OK one stays)", db_target=True)
    p.add_argument("--keep", type=int, metavar="N")
    return parser


def read_status(ctx, target_info):
    found = migrations.discover(ctx.settings.path("MIGRATIONS_DIR"))
    conn = connect(target_info)
    try:
        return migrations.read_status(conn, found)
    finally:
        conn.close()


def cmd_status(args, ctx):
    status = read_status(ctx, ctx.db_target())
    if ctx.json:
        ctx.emit_json(status.to_json())
    else:
        for line in status.lines():
            ctx.log.info("%s", line)


def automatic_point(ctx, target, lock, description: str):
    """The rollback point taken, under the lock already held, before migrations change the database."""
    point = backup.create_point(target, ctx.settings.backup_dir, ctx.script, description,
                                code_commit=ctx.code_commit(), pg_bin_dir=ctx.pg_bin_dir,
                                lock=lock, warm_copies=ctx.warm_copies, confirm=ctx.confirm)
    ctx.log.info("Automatic rollback point: %s", point.id)
    return point


def cmd_migrate(args, ctx):
    """Apply pending migrations: the folder and each migration are named, a rollback point of the
    current state is taken first, and the question is asked (exit 3 without a terminal and --yes)."""
    target = ctx.db_target()
    folder = ctx.settings.path("MIGRATIONS_DIR")
    # The lock first: what is pending is read, shown and applied with no other operation in between.
    with DatabaseLock(target, target.dbname, ctx.script) as lock:
        status = read_status(ctx, target)
        for m in status.edited:
            ctx.log.warning("warning: %s was edited since it was applied (checksum differs)", m.path.name)
        todo = migrations.to_apply(status, args.target)
        if not todo:
            ctx.log.info("Nothing to apply: %s is at %s (migrations in %s).", target.dbname,
                         status.head or "no migration", folder)
            return
        ctx.confirm(f"Apply {len(todo)} migration(s) from {folder} to {target.dbname}?",
                    [f"apply {m.full_name} ({m.path.name})" for m in todo] +
                    [f"{target.dbname} is at {status.head or 'no migration'} now; a rollback point of it is taken first"])
        point = automatic_point(ctx, target, lock, f"automatic before migrating to {todo[-1].full_name}")
        ctx.log.info("Applying %d migration(s) to %s:", len(todo), target.dbname)
        for n, m in enumerate(todo, 1):
            try:
                migrations.apply(target, m)
            except migrations.MigrationFailed as exc:
                done = ", ".join(x.full_name for x in todo[: n - 1]) or "none"
                raise RollbackError(f"{exc} Applied before it: {done}. Stopped; later migrations were not run. To "
                                    f"return to the state before: python3 quick_rollback.py") from None
            ctx.log.info("  [%d/%d] applied %s", n, len(todo), m.full_name)
    ctx.log.info("Done: %s is at %s. Undo with: python3 quick_rollback.py (rollback point %s)", target.dbname,
                 todo[-1].full_name, point.id)


def cmd_rollback(args, ctx):
    target = ctx.db_target()
    status = read_status(ctx, target)
    goal = migrations.resolve(status.migrations, args.target)
    todo = migrations.to_revert(status, args.target)
    if not todo:
        ctx.log.info("Nothing to revert: %s is already at %s.", target.dbname, goal.full_name)
        return
    missing = [m for m in todo if m.down is None]
    if missing:
        point = next((p for p in runbooks.scan(ctx, target) if p.status == catalog.OK
                      and p.database == target.dbname and p.migration_head == goal.version), None)
        hint = (f"The newest rollback point at {goal.full_name} is {point.id}: python3 database_rollback.py "
                f"restore {point.path or point.id}") if point else f"No rollback point records {goal.full_name} as its head."
        raise UsageError("cannot revert: no down script " + ", ".join(
            f"{m.version}_{m.name}.down.sql" for m in missing) + f". Nothing was changed. {hint}")
    ctx.confirm(f"Roll {target.dbname} back to {goal.full_name}?",
                [f"revert {m.full_name} ({m.down.name})" for m in todo] +
                ["an automatic rollback point of the current state is taken first"])
    with DatabaseLock(target, target.dbname, ctx.script) as lock:
        if migrations.to_revert(read_status(ctx, target), args.target) != todo:
            raise UsageError("the migrations changed while you confirmed; run the command again. Nothing was changed.")
        point = automatic_point(ctx, target, lock, f"automatic before rollback to {goal.full_name}")
        testhooks.checkpoint("rollback-point-taken")
        for n, m in enumerate(todo, 1):
            try:
                migrations.revert(target, m)
            except migrations.MigrationFailed as exc:
                at = todo[n - 1].full_name
                raise RollbackError(
                    f"{exc} Stopped at a migration boundary: {target.dbname} is at {at} "
                    f"({n - 1} of {len(todo)} reverted). To return to the state before this rollback: "
                    f"python3 database_rollback.py restore {point.path}") from None
            ctx.log.info("  [%d/%d] reverted %s", n, len(todo), m.full_name)
    ctx.log.info("Done: %s is back at %s. Undo with: python3 database_rollback.py restore %s",
                 target.dbname, goal.full_name, point.path)


def cmd_restore(args, ctx):
    point = catalog.resolve(ctx.settings.backup_dir, args.path)
    runbooks.restore_point(ctx, ctx.db_target(), point, force=args.force, drop_previous=args.drop_previous)


def cmd_verify(args, ctx):
    runbooks.verify_database(ctx, ctx.db_target(), args.file, quick=args.quick, strict=args.strict)


def cmd_cleanup(args, ctx):
    runbooks.cleanup(ctx, ctx.db_target(), args.days, args.keep, args.dry_run)


def cmd_backup(args, ctx):
    target = ctx.db_target()
    ctx.show_point(backup.create_point(target, ctx.settings.backup_dir, ctx.script, args.description,
                                       code_commit=ctx.code_commit(), confirm=ctx.confirm,
                                       pg_bin_dir=ctx.pg_bin_dir, method=args.method, compress=args.compress,
                                       warm_copies=ctx.warm_copies))


COMMANDS = {"backup": cmd_backup, "restore": cmd_restore, "verify": cmd_verify, "cleanup": cmd_cleanup,
            "migrate": cmd_migrate, "status": cmd_status, "rollback": cmd_rollback}


if __name__ == "__main__":
    cli.main("database_rollback", build_parser(), COMMANDS)
