#!/usr/bin/env python3
"""Make a rollback point of staging before a migration.

    python3 create_rollback_point.py "Before migration test"
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli  # noqa: E402
from common.points import backup  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser("create_rollback_point.py", __doc__)
    parser.add_argument("description", nargs="?", default="", help="what this point is for")
    parser.add_argument("--method", choices=backup.METHODS, help="force one backup approach")
    parser.add_argument("--compress", metavar="SPEC",
                        help="pg_dump --compress value (default: lz4 where pg_dump has it, else 0)")
    cli.common_flags(parser, destructive=False, machine=True)
    cli.warm_flag(parser, making=True)
    cli.yes_flag(parser)
    return parser


def handle(args, ctx: cli.Context) -> int:
    staging = ctx.staging()
    ctx.show_point(backup.create_point(staging, ctx.settings.backup_dir, ctx.script, args.description,
                                       code_commit=ctx.code_commit(), confirm=ctx.confirm,
                                       pg_bin_dir=ctx.pg_bin_dir, method=args.method, compress=args.compress,
                                       warm_copies=ctx.warm_copies))


if __name__ == "__main__":
    cli.main("create_rollback_point", build_parser(), handle)
