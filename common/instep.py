"""Code and database in step (DESIGN §7, "The application's migrations"): the migrations the code at
REPO_PATH expects (common.files.appcode) against those the database has applied
(common.pg.frameworks), named with what to run. Advisory: it never fails the command it follows."""
from __future__ import annotations

from typing import List, Optional

import psycopg2

from .cli import Context
from .errors import RollbackError
from .files import appcode
from .pg import frameworks
from .pg.database import ConnInfo, connect
from .points.catalog import RollbackPoint


def code_out_of_step(ctx: Context, info: ConnInfo) -> Optional[List[str]]:
    """Where the migrations the code at REPO_PATH expects and those the database has differ, per
    framework (None: REPO_PATH unset, or no framework's migrations in its code)."""
    repo = ctx.settings.get("REPO_PATH")
    if not repo or not ctx.settings.path("REPO_PATH").is_dir():
        return None
    code = appcode.expected(ctx.settings.path("REPO_PATH"))
    if not code:
        return None
    conn = connect(info)
    try:
        database = frameworks.applied(conn)
    finally:
        conn.close()
    return appcode.mismatches(code, database)


def out_of_step_lines(ctx: Context, info: ConnInfo, point: Optional[RollbackPoint] = None) -> List[str]:
    """The mismatches, and what to run: the code back too, or the migrations on purpose."""
    try:
        found = code_out_of_step(ctx, info)
    except (OSError, ValueError, psycopg2.Error, RollbackError) as exc:  # advisory: never fails the command
        return [f"the code at {ctx.settings.get('REPO_PATH')} was not compared with {info.dbname}'s migrations: "
                f"{exc}", "compare them by hand with the framework's own status command"]
    if not found:
        return []
    commit = point.code_commit if point is not None else None
    back = f"python3 code_rollback.py rollback {commit[:12]} (the commit recorded with the point)" if commit else \
        "python3 code_rollback.py rollback <the release's commit>"
    return [f"the code at {ctx.settings.get('REPO_PATH')} and {info.dbname} are out of step: {line}" for line in found] + \
        [f"to bring them in step, roll the code back too ({back}, or python3 rollback_manager.py restore --all), "
         "or apply the migrations on purpose with the framework's own command"]
