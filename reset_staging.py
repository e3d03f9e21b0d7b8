#!/usr/bin/env python3
"""Emergency reset: make staging an exact, fresh copy of V2.

    python3 reset_staging.py

V2 is only read (pg_dump in one snapshot, with the pg_dump matching V2's server); staging is
replaced by restore-into-new-database and a rename swap, and the old staging is kept as
<staging>__pre_rollback_<ts>."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli, runbooks  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = cli.script_parser("reset_staging.py", __doc__)
    parser.add_argument("--drop-previous", action="store_true",
                        help="drop the replaced staging instead of keeping it")
    cli.common_flags(parser, machine=True)
    return parser


def handle(args, ctx: cli.Context) -> int:
    runbooks.reset_from_v2(ctx, ctx.conninfo("V2_DATABASE_URL"), ctx.staging(),
                           drop_previous=args.drop_previous)
    return 0


if __name__ == "__main__":
    cli.main("reset_staging", build_parser(), handle)
