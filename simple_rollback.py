#!/usr/bin/env python3
"""The fallback that needs no client tools: server-side snapshots of staging (psycopg2 only).

    python3 simple_rollback.py create "Before migration test"
    python3 simple_rollback.py list [--json]
    python3 simple_rollback.py restore [NAME]      # the newest snapshot by default
    python3 simple_rollback.py drop NAME

A snapshot is `CREATE DATABASE <staging>_snap_<ts> TEMPLATE <staging>` on staging's own server:
no pg_dump, so no version mismatch, and the fastest rollback there is. The role needs CREATEDB."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli, runbooks  # noqa: E402
from common.errors import UsageError  # noqa: E402
from common.pg.database import maintenance_db  # noqa: E402
from common.points import catalog, report, snapshot  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli.command_parser("simple_rollback.py", __doc__)
    p = sub.add_parser("create", help="snapshot staging (its connections are cut for the copy)")
    p.add_argument("description", nargs="?", default="")
    cli.common_flags(p, destructive=False, machine=True)
    cli.yes_flag(p)
    p = sub.add_parser("list", help="snapshots of staging, and snapshot databases without a sidecar")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("restore", help="restore staging from a snapshot (newest by default)")
    p.add_argument("name", nargs="?", help="snapshot database name or rollback point id")
    p.add_argument("--drop-previous", action="store_true", help="do not keep the replaced database")
    cli.common_flags(p, machine=True)
    p = sub.add_parser("drop", help="drop a snapshot database (and its sidecar)")
    p.add_argument("name")
    cli.common_flags(p)
    return parser


def cmd_create(args, ctx):
    staging = ctx.staging()
    ctx.show_point(snapshot.create_snapshot(staging, ctx.settings.backup_dir, ctx.script, args.description, confirm=ctx.confirm,
                                            wait=ctx.wait))


def cmd_list(args, ctx):
    staging = ctx.staging()
    points = [p for p in runbooks.scan(ctx, staging) if p.kind == catalog.SNAPSHOT]
    conn = maintenance_db(staging)
    try:
        orphans = snapshot.orphans(conn, staging.dbname, points, ctx.settings.backup_dir)
    finally:
        conn.close()
    if ctx.json:
        ctx.emit_json({"snapshots": [p.summary() for p in points], "orphans": orphans})
        return
    print(f"Snapshots of {staging.dbname}:")
    print(report.points_table(points))
    for name in orphans:
        print(f"orphan snapshot database (no sidecar): {name}  -> python3 simple_rollback.py drop {name}")


def cmd_restore(args, ctx):
    staging = ctx.staging()
    point = snapshot.resolve(ctx.settings.backup_dir, args.name, staging.dbname, runbooks.scan(ctx, staging))
    runbooks.restore_point(ctx, staging, point, drop_previous=args.drop_previous)


def cmd_drop(args, ctx):
    staging = ctx.staging()
    points = runbooks.scan(ctx, staging)
    match = [p for p in points if p.kind == catalog.SNAPSHOT and args.name in (p.id, p.snapshot_database)]
    if match:
        ctx.confirm(f"Drop snapshot {match[0].snapshot_database}?", report.point_details(match[0])[:12])
        runbooks.delete_point(ctx, match[0], staging)
        return
    conn = maintenance_db(staging)
    try:
        if args.name not in snapshot.orphans(conn, staging.dbname, points, ctx.settings.backup_dir):
            raise UsageError(f"no snapshot {args.name!r} of {staging.dbname}. Nothing was changed.")
    finally:
        conn.close()
    ctx.confirm(f"Drop orphan snapshot database {args.name}?", ["it has no sidecar, so no rollback point uses it"])
    runbooks.drop_orphan(ctx, staging, args.name)


COMMANDS = {"create": cmd_create, "list": cmd_list, "restore": cmd_restore, "drop": cmd_drop}


if __name__ == "__main__":
    cli.main("simple_rollback", build_parser(), COMMANDS)
