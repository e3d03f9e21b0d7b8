#!/usr/bin/env python3
"""Database rollback for the DB_* target (or STAGING_DATABASE_URL when DB_NAME is unset).

    python3 database_rollback.py backup
    python3 database_rollback.py restore /path/to/backup.dump
    python3 database_rollback.py verify [--json] [--strict]
    python3 database_rollback.py cleanup 30
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import backup, catalog, cli, health, runbooks  # noqa: E402
from common.errors import VerifyProblems  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="database_rollback.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("backup", help="make a rollback point of the target database")
    p.add_argument("description", nargs="?", default="")
    p.add_argument("--method", choices=backup.METHODS)
    p.add_argument("--compress", metavar="SPEC")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("restore", help="restore the target from a rollback point (never half-done)")
    p.add_argument("path", help="the .dump file (with its .json sidecar beside it) or a rollback point id")
    p.add_argument("--force", action="store_true", help="allow a backup of another database")
    p.add_argument("--drop-previous", action="store_true", help="do not keep the replaced database")
    cli.common_flags(p, machine=True)
    p = sub.add_parser("verify", help="health and drift report (exit 4 on problems)")
    p.add_argument("--strict", action="store_true", help="count drift from the newest rollback point as a problem")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("cleanup", help="remove rollback points older than DAYS (the newest OK one stays)")
    p.add_argument("days", type=float)
    p.add_argument("--keep", type=int, metavar="N")
    p.add_argument("--dry-run", action="store_true")
    cli.common_flags(p)
    return parser


def cmd_restore(args, ctx):
    point = catalog.resolve(ctx.settings.backup_dir, args.path)
    runbooks.restore_point(ctx, ctx.db_target(), point, force=args.force, drop_previous=args.drop_previous)


def cmd_verify(args, ctx):
    target = ctx.db_target()
    report = health.check(target, runbooks.newest_point(ctx, target.dbname))
    problems = report.problems(args.strict)
    if ctx.json:
        ctx.emit_json(report.to_json(args.strict))
    else:
        for line in report.lines(args.strict):
            ctx.log.info("%s", line)
    if problems:
        raise VerifyProblems(f"{len(problems)} problem(s) found in {target.dbname}")


def cmd_cleanup(args, ctx):
    runbooks.cleanup(ctx, ctx.db_target(), args.days, args.keep, args.dry_run)


def cmd_backup(args, ctx):
    target = ctx.db_target()
    ctx.show_point(backup.create_point(target, ctx.settings.backup_dir, ctx.script, args.description,
                                       pg_bin_dir=ctx.pg_bin_dir, method=args.method, compress=args.compress))


COMMANDS = {"backup": cmd_backup, "restore": cmd_restore, "verify": cmd_verify, "cleanup": cmd_cleanup}


def handle(args, ctx: cli.Context):
    return COMMANDS[args.command](args, ctx)


if __name__ == "__main__":
    cli.main("database_rollback", build_parser(), handle)
