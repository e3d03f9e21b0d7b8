#!/usr/bin/env python3
"""Full control over rollback points of the staging database.

    python3 rollback_manager.py [V2_DATABASE_URL STAGING_DATABASE_URL] COMMAND [OPTIONS]

The two URLs may be omitted: they are then read from the environment / .env (which also keeps
the passwords out of the process list).

Commands: list, info --file F, create [--description D] [--method M], restore --file F,
restore --latest, verify --file F, delete --file F, reset (staging from V2),
warm [--file F] (make a point warm again), drill [--file F | --latest | --every] [--all]
(rehearse a rollback where nobody works), cleanup [--older-than DAYS] [--keep N] [--dry-run]

The whole release (configuration, code and database under one id):
    python3 rollback_manager.py create --all --description "Release 42"
    python3 rollback_manager.py restore --all --latest        # or --all --file RELEASE_ID"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli, runbooks  # noqa: E402
from common.errors import UsageError, VerifyProblems  # noqa: E402
from common.points import backup, catalog, fill, report  # noqa: E402
from common.release import records  # noqa: E402
from common.release import runbook as release_runbook  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli.command_parser("rollback_manager.py", __doc__)

    p = sub.add_parser("list", help="rollback points, newest first, with their status")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("info", help="everything recorded about one rollback point")
    p.add_argument("--file", required=True, help="dump file, sidecar or id")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("create", help="make a rollback point of staging (--all: of the whole release)")
    p.add_argument("--all", action="store_true",
                   help="a release rollback point: configuration, code and database under one id")
    p.add_argument("--description", default="")
    p.add_argument("--method", choices=backup.METHODS)
    p.add_argument("--compress", metavar="SPEC")
    cli.common_flags(p, destructive=False, machine=True)
    cli.warm_flag(p, making=True)
    cli.yes_flag(p)
    p = sub.add_parser("restore", help="restore staging from a rollback point")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--file", help="dump file, sidecar or id")
    which.add_argument("--latest", action="store_true", help="the newest OK rollback point of staging")
    which.add_argument("--pick", nargs="?", const=0, type=int, metavar="N",
                       help="choose from the numbered list (asks for the number without N)")
    p.add_argument("--force", action="store_true", help="allow a backup of another database")
    p.add_argument("--drop-previous", action="store_true", help="do not keep the replaced database")
    p.add_argument("--all", action="store_true", help="roll the whole release back (--file RELEASE_ID or "
                   "--latest): configuration, then code, then database, each verified")
    p.add_argument("--monitor", type=float, default=0.0, metavar="SECONDS",
                   help="with --all: watch the health metrics this long after the rollback")
    cli.common_flags(p, machine=True)
    cli.warm_flag(p, making=False)
    p = sub.add_parser("reset", help="emergency: staging := a fresh copy of V2")
    p.add_argument("--drop-previous", action="store_true", help="do not keep the replaced database")
    cli.common_flags(p, machine=True)
    p = sub.add_parser("cleanup", help="remove old rollback points and kept databases")
    p.add_argument("--older-than", type=float, metavar="DAYS")
    p.add_argument("--keep", type=int, metavar="N", help="keep the N newest OK points of each database")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    cli.common_flags(p)
    p = sub.add_parser("verify", help="staging against the point it was restored from (content, schema); with "
                                      "--file, that point's dump: checksum and readability (exit 4 on problems)")
    p.add_argument("--file", help="check this rollback point's backup instead")
    p.add_argument("--strict", action="store_true", help="count any difference from the point as a problem (exit 4)")
    p.add_argument("--quick", action="store_true", help="compare tables and row counts only")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("drill", help="rehearse a rollback: restore a point into a scratch database beside staging, "
                                     "prove it against the point, time it, drop it (staging is not touched)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--file", help="dump file, sidecar or id (with --all: a release id)")
    which.add_argument("--latest", action="store_true", help="the newest OK point (the default)")
    which.add_argument("--every", action="store_true", help="every OK point of staging, the longest undrilled first")
    p.add_argument("--all", action="store_true", help="drill a whole release: configuration and code restored into "
                   "scratch folders and checked, the database as above")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("warm", help="make a rollback point warm again: a sealed copy that a rollback swaps in")
    p.add_argument("--file", help="dump file, sidecar or id (default: the newest OK point of staging)")
    cli.common_flags(p, destructive=False, machine=True)
    p = sub.add_parser("delete", help="remove a rollback point (its dump and sidecar)")
    p.add_argument("--file", required=True)
    cli.common_flags(p)
    return parser


def split_urls(argv):
    """The documents' form puts two URLs before the command: take them off the front."""
    urls = []
    while argv and "://" in argv[0]:
        urls.append(argv.pop(0))
    return urls, argv


def staging_or_none(ctx, args):
    if ctx.settings.get("STAGING_DATABASE_URL"):
        return ctx.staging()
    return None


def cmd_list(args, ctx):
    staging = staging_or_none(ctx, args)
    points = runbooks.scan(ctx, staging)
    releases = runbooks.releases(ctx, points)
    interrupted = records.interrupted(ctx.settings.backup_dir)
    held = runbooks.server_inventory(ctx, staging, points)
    if ctx.json:
        ctx.emit_json({"backup_dir": str(ctx.settings.backup_dir), "points": [p.summary() for p in points],
                       "releases": [r.summary() for r in releases], "interrupted_releases": interrupted,
                       "server": held})
        return
    if held["reachable"] is False:
        print(f"WARNING: the server cannot be reached ({held['error']}): snapshots, warm copies and replaced "
              "databases are shown as unknown.")
    print(f"Rollback points in {ctx.settings.backup_dir}:")
    print(report.points_table(points, server_known=held["reachable"] is not False))
    print("\n".join(report.held_lines(held, staging.dbname if staging else None)))
    if releases:
        print("\nRelease rollback points (configuration, code, database), newest first:")
        for r in releases:
            print("\n".join(r.lines()))
    for line in interrupted:
        print(f"WARNING: {line}")


def cmd_info(args, ctx):
    if args.file.startswith("release_"):
        points = runbooks.scan(ctx, staging_or_none(ctx, args))
        found = [r for r in runbooks.releases(ctx, points) if args.file in (r.id, r.sidecar.name)]
        if not found:
            raise UsageError(f"no release {args.file!r} (see: python3 rollback_manager.py list). Nothing was changed.")
        if ctx.json:
            ctx.emit_json(found[0].summary())
        else:
            print("\n".join(found[0].lines()))
        return
    point = catalog.resolve(ctx.settings.backup_dir, args.file)
    catalog.quick_check(point, runbooks.scan_checker(ctx, staging_or_none(ctx, args)))
    runbooks.check_restorable(ctx, point)
    if ctx.json:
        ctx.emit_json(point.summary())
    else:
        print("\n".join(report.point_details(point)))


def cmd_create(args, ctx):
    staging = ctx.staging()
    if args.all:
        release_runbook.create_release(ctx, staging, args.description)
        return
    ctx.show_point(backup.create_point(staging, ctx.settings.backup_dir, ctx.script, args.description,
                                       code_commit=ctx.code_commit(), confirm=ctx.confirm,
                                       pg_bin_dir=ctx.pg_bin_dir, method=args.method, compress=args.compress,
                                       warm_copies=ctx.warm_copies))


def cmd_verify(args, ctx):
    if args.file is None:
        runbooks.verify_database(ctx, ctx.staging(), None, quick=args.quick, strict=args.strict)
        return
    point = catalog.resolve(ctx.settings.backup_dir, args.file)
    try:
        fill.verify_point(point, ctx.pg_bin_dir, staging_or_none(ctx, args))
    except VerifyProblems:
        raise
    except Exception as exc:
        if ctx.json:
            ctx.emit_json({**point.summary(), "ok": False})
        raise VerifyProblems(str(exc)) from None
    if ctx.json:
        ctx.emit_json({**point.summary(), "ok": True})
    else:
        ctx.log.info("Rollback point %s is OK: %s, sha256 matches, readable by pg_restore.",
                     point.id, report.human_size(point.size_bytes))


def cmd_restore(args, ctx):
    staging = ctx.staging()
    if args.all:
        if args.pick is not None:
            raise UsageError("--all takes --latest or --file RELEASE_ID, not --pick. Nothing was changed.")
        return release_runbook.restore_release(ctx, staging, None if args.latest else args.file, args.monitor)
    if args.latest:
        point = runbooks.newest_point(ctx, staging)
        if point is None:
            raise UsageError(f"no OK rollback point of {staging.dbname} in {ctx.settings.backup_dir}. "
                             "Nothing was changed. Reset from V2 with: python3 rollback_manager.py reset")
    elif args.pick is not None:
        point = pick(ctx, runbooks.scan(ctx, staging), args.pick)
    else:
        point = catalog.resolve(ctx.settings.backup_dir, args.file)
    runbooks.restore_point(ctx, staging, point, force=args.force, drop_previous=args.drop_previous)


def pick(ctx, points, number: int):
    """The menu's advanced rollback: the points numbered as `list` shows them, one chosen."""
    print(report.points_table(points))
    if not points:
        raise UsageError(f"no rollback points in {ctx.settings.backup_dir}. Nothing was changed.")
    if not number:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask on: give the number, e.g. restore --pick 2. Nothing was changed.")
        answer = input(f"Number of the rollback point to restore (1-{len(points)}): ").strip()
        number = int(answer) if answer.isdigit() else -1
    if not 1 <= number <= len(points):
        raise UsageError(f"no rollback point number {number} (1-{len(points)}). Nothing was changed.")
    chosen = points[number - 1]
    if chosen.status != catalog.OK:
        raise UsageError(f"rollback point {chosen.id} is {chosen.status} ({chosen.problem}); choose an OK one. "
                         "Nothing was changed.")
    return chosen


def cmd_reset(args, ctx):
    runbooks.reset_from_v2(ctx, ctx.conninfo("V2_DATABASE_URL"),
                           ctx.staging(), drop_previous=args.drop_previous)


def cmd_cleanup(args, ctx):
    runbooks.cleanup(ctx, staging_or_none(ctx, args), args.older_than, args.keep, args.dry_run)


def cmd_drill(args, ctx):
    staging = ctx.staging()
    if args.all:
        if args.every:
            raise UsageError("--all takes --latest or --file RELEASE_ID, not --every. Nothing was changed.")
        return release_runbook.drill_release(ctx, staging, args.file)
    if args.every:
        return runbooks.drill_points(ctx, staging, None)
    point = catalog.resolve(ctx.settings.backup_dir, args.file) if args.file else runbooks.newest_point(ctx, staging)
    if point is None:
        raise UsageError(f"no OK rollback point of {staging.dbname} in {ctx.settings.backup_dir}. Nothing was changed.")
    return runbooks.drill_points(ctx, staging, [point])


def cmd_warm(args, ctx):
    staging = ctx.staging()
    point = (catalog.resolve(ctx.settings.backup_dir, args.file) if args.file else
             runbooks.newest_point(ctx, staging))
    if point is None:
        raise UsageError(f"no OK rollback point of {staging.dbname} in {ctx.settings.backup_dir}. Nothing was changed.")
    if args.file:
        catalog.quick_check(point)
        runbooks.check_restorable(ctx, point)
    return 0 if runbooks.warm_point(ctx, staging, point) else 1


def cmd_delete(args, ctx):
    point = catalog.resolve(ctx.settings.backup_dir, args.file)
    staging = staging_or_none(ctx, args)
    catalog.quick_check(point, runbooks.scan_checker(ctx, staging))
    ctx.confirm(f"Delete rollback point {point.id}?", report.point_details(point)[:12])
    runbooks.delete_point(ctx, point, staging)


COMMANDS = {"list": cmd_list, "info": cmd_info, "create": cmd_create, "restore": cmd_restore, "reset": cmd_reset,
            "cleanup": cmd_cleanup, "verify": cmd_verify, "delete": cmd_delete, "warm": cmd_warm,
            "drill": cmd_drill}


def main(argv=None) -> int:
    parser = build_parser()
    urls, rest = split_urls(list(sys.argv[1:] if argv is None else argv))
    if len(urls) not in (0, 2):
        parser.error("give both URLs (V2, then staging) before the command, or neither")

    if urls and rest:  # the documents' positional form is the same as the two flags
        rest += ["--v2-url", urls[0], "--staging-url", urls[1]]
    return cli.execute("rollback_manager", parser, cli.dispatch(COMMANDS), rest)


if __name__ == "__main__":
    sys.exit(main())
