#!/usr/bin/env python3
"""Quick rollback: restore staging from its newest OK rollback point.

    python3 quick_rollback.py            # newest OK rollback point; with none, offers a reset from V2
    python3 quick_rollback.py --from-v2  # reset staging from V2 (production is only read)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli, runbooks  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser("quick_rollback.py", __doc__)
    parser.add_argument("--from-v2", action="store_true", help="reset staging from V2 instead")
    parser.add_argument("--drop-previous", action="store_true",
                        help="drop the replaced database instead of keeping it as <db>__pre_rollback_<ts>")
    cli.common_flags(parser, machine=True)
    cli.warm_flag(parser, making=False)
    return parser


def handle(args, ctx: cli.Context) -> int:
    staging = ctx.staging()
    if args.from_v2:
        runbooks.reset_from_v2(ctx, ctx.conninfo("V2_DATABASE_URL"), staging, drop_previous=args.drop_previous)
        return 0
    runbooks.require_database(staging)
    points = runbooks.scan(ctx, staging)
    for skipped in points:  # newer points that cannot be used are named, not silently passed over
        if skipped.database == staging.dbname and skipped.status == "OK":
            break
        if skipped.database == staging.dbname:
            ctx.log.warning("Skipping rollback point %s: %s (%s)", skipped.id, skipped.status, skipped.problem)
    point = next((p for p in points if p.status == "OK" and p.database == staging.dbname), None)
    if point is None:
        ctx.log.info("No OK rollback point of %s in %s.", staging.dbname, ctx.settings.backup_dir)
        ctx.log.info("The fallback is a reset of staging from V2 (a fresh copy of production).")
        runbooks.reset_from_v2(ctx, ctx.conninfo("V2_DATABASE_URL"), staging, drop_previous=args.drop_previous)
        return 0
    ctx.log.info("Newest OK rollback point of %s: %s (%s)", staging.dbname, point.id, point.description or "-")
    runbooks.restore_point(ctx, staging, point, drop_previous=args.drop_previous,
                           question=f"Roll {staging.dbname} back to {point.id}?")
    return 0


if __name__ == "__main__":
    cli.main("quick_rollback", build_parser(), handle)
