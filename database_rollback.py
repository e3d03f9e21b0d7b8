#!/usr/bin/env python3
"""Database rollback for the DB_* target (or STAGING_DATABASE_URL when DB_NAME is unset).

    python3 database_rollback.py backup
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import backup, cli  # noqa: E402


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
    return parser


def cmd_backup(args, ctx):
    target = ctx.db_target()
    ctx.show_point(backup.create_point(target, ctx.settings.backup_dir, ctx.script, args.description,
                                       pg_bin_dir=ctx.pg_bin_dir, method=args.method, compress=args.compress))


COMMANDS = {"backup": cmd_backup}


def handle(args, ctx: cli.Context):
    return COMMANDS[args.command](args, ctx)


if __name__ == "__main__":
    cli.main("database_rollback", build_parser(), handle)
