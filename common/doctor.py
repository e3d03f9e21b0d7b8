"""Menu choice 2, Check configuration: every variable, both connections, the client tools and
whether each matches its server, free space for a backup of staging.

    python3 -m common.doctor [--json]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import List, Optional

from . import cli, instep, trust
from .env import DEFAULTS, EXAMPLES, NEEDED
from .errors import RollbackError, VerifyProblems
from .log import mask
from .pg import pgbouncer
from .pg.database import ConnInfo, connect, database_size, server_version
from .pg.pgtools import candidates, choose
from .points import catalog
from .progress import human_size

VARIABLES = ["V2_DATABASE_URL", "STAGING_DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD",
             "BACKUP_DIR", "LOG_DIR", "MIGRATIONS_DIR", "REPO_PATH", "CODE_BACKUP_DIR", "DEPLOYMENT_DIR",
             "CONFIG_DIR", "CONFIG_BACKUP_DIR", "ENV_FILE", "PG_BIN_DIR", "ROLLBACK_WARM_COPIES", "ROLLBACK_KEEP_REPLACED",
             "PGBOUNCER_ADMIN_URL", "PGBOUNCER_DATABASE"]
REQUIRED = ("V2_DATABASE_URL", "STAGING_DATABASE_URL")


def check(ctx: cli.Context) -> dict:
    s = ctx.settings
    report: dict = {"env_file": str(s.env_file), "env_file_found": s.env_file_found, "variables": {},
                    "servers": {}, "tools": {}, "problems": []}
    unset: List[str] = []  # optional settings that only some commands need: said, not counted as problems
    for name in VARIABLES:
        value = s.get(name)
        shown = None if value is None else ("***" if "PASSWORD" in name else mask(value))
        origin = "default" if value is not None and not s.values.get(name) and name in DEFAULTS else "set"
        report["variables"][name] = {"value": shown, "origin": origin if value is not None else "missing"}
        if value is None and name in REQUIRED:
            report["problems"].append(f"{name} is not set (add {name}=postgresql://... to {s.env_file})")
        elif value is None and name in NEEDED:
            unset.append(f"{name} is not set: {NEEDED[name]}; rollback points, restores and resets work without it, the commands "
                         f"that need it stop and say so (add {name}={EXAMPLES[name]} to {s.env_file})")
    report["folders"] = {}
    for name in trust.FOLDER_SETTINGS:
        if not s.get(name):
            continue
        exists = s.path(name).is_dir()
        try:
            trust.check_folder(s.path(name), name)
            report["folders"][name] = {"path": str(s.path(name)), "ok": True, "exists": exists}
        except RollbackError as exc:
            report["folders"][name] = {"path": str(s.path(name)), "ok": False, "exists": exists, "error": str(exc)}
            report["problems"].append(str(exc))
    folders_ok = all(f["ok"] for f in report["folders"].values())
    staging_size: Optional[int] = None
    code_advice: List[str] = []  # what to run when code and staging's migrations are out of step
    for name in REQUIRED:
        if not s.get(name):
            continue
        entry: dict = {}
        try:
            info = ConnInfo.parse(s.get(name), what=name)
            if name == "STAGING_DATABASE_URL" and folders_ok:
                ctx.repair(info)
            conn = connect(info)
            try:
                major, version = server_version(conn)
                entry.update(url=info.masked(), version=version, size_bytes=database_size(conn, info.dbname))
            finally:
                conn.close()
            if name == "STAGING_DATABASE_URL":
                staging_size = entry["size_bytes"]
                found = instep.out_of_step_lines(ctx, info)
                report["problems"] += found[:-1]
                code_advice += found[-1:]
            for tool in ("pg_dump", "pg_restore"):
                found = candidates(tool, s.get("PG_BIN_DIR"))
                chosen = choose(found, major, major if tool == "pg_dump" else 0)
                entry[tool] = chosen.describe() if chosen else None
                if chosen is None:
                    report["problems"].append(f"no {tool} for the PostgreSQL {major} server of {name} (found: "
                                              f"{', '.join(t.version for t in found) or 'none'}); set PG_BIN_DIR")
                elif chosen.major != major:
                    entry[tool] += f" (newer than the server's {major})"
        except RollbackError as exc:
            entry["error"] = str(exc)
            report["problems"].append(f"{name}: {exc}")
        report["servers"][name] = entry
    for tool in ("pg_dump", "pg_restore", "psql"):
        try:
            report["tools"][tool] = [t.describe() for t in candidates(tool, s.get("PG_BIN_DIR"))]
        except RollbackError as exc:
            report["tools"][tool] = []
            report["problems"].append(str(exc))
    if s.get("PGBOUNCER_ADMIN_URL") and s.get("STAGING_DATABASE_URL"):
        try:
            pooler = pgbouncer.from_settings(s, ConnInfo.parse(s.get("STAGING_DATABASE_URL")).dbname)
            pooler.check()
            report["pgbouncer"] = {"console": pooler.admin.masked(), "database": pooler.database, "ok": True}
        except RollbackError as exc:
            report["pgbouncer"] = {"ok": False, "error": str(exc)}
            report["problems"].append(f"PGBOUNCER_ADMIN_URL: {exc}")
    folder = s.backup_dir
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
    free = shutil.disk_usage(probe).free
    newest = next((p for p in catalog.scan(folder) if p.kind == catalog.DUMP and p.status == catalog.OK), None) \
        if folders_ok else None
    report["backup_dir"] = {"path": str(folder), "free_bytes": free, "staging_bytes": staging_size,
                            "newest_point_bytes": newest.size_bytes if newest else None}
    report["warnings"] = list(code_advice) + unset + _readable_env_file(s.env_file)
    if staging_size is not None and free < staging_size:
        report["problems"].append(f"{folder} has {human_size(free)} free, staging is {human_size(staging_size)}")
    if newest is not None and free < 2 * newest.size_bytes:
        report["warnings"].append(f"{folder} has {human_size(free)} free, less than twice the newest rollback point "
                                  f"({human_size(newest.size_bytes)}): the next point may not fit. Remove old ones "
                                  "with: python3 rollback_manager.py cleanup --keep 2 --dry-run")
    return report


_SECRET_LINE = re.compile(r"://[^/\s@]*:[^/\s@]+@|PASSWORD\s*=\s*\S")


def _readable_env_file(path: Path) -> List[str]:
    """A warning when the settings file holds a password and other users may read it."""
    try:
        st = os.stat(path)
        if not st.st_mode & 0o077 or not _SECRET_LINE.search(path.read_text(errors="replace")):
            return []
    except OSError:
        return []
    return [f"{path} holds a password and other users may read it (mode {stat.S_IMODE(st.st_mode):o}): "
            f"chmod 600 {path}"]


def show(ctx: cli.Context, report: dict) -> None:
    log = ctx.log
    log.info("Environment file: %s (%s)", report["env_file"], "found" if report["env_file_found"] else "not found")
    for name, v in report["variables"].items():
        log.info("  %-22s %s", name, v["value"] if v["value"] is not None else "(missing)")
    for name, entry in report["servers"].items():
        if "error" in entry:
            log.info("%s: %s", name, entry["error"])
            continue
        log.info("%s: %s, PostgreSQL %s, %s", name, entry["url"], entry["version"], human_size(entry["size_bytes"]))
        for tool in ("pg_dump", "pg_restore"):
            log.info("  %-10s %s", tool, entry.get(tool) or "NONE that matches")
    for name, f in report["folders"].items():
        log.info("%-18s %s: %s", name, f["path"], "NOT TRUSTED (see below)" if not f["ok"] else "owner and mode OK"
                 if f["exists"] else "not made yet (made owner-only when first used; the folders above it are safe)")
    for tool, found in report["tools"].items():
        log.info("%s found: %s", tool, "; ".join(found) or "none")
    if "pgbouncer" in report:
        p = report["pgbouncer"]
        log.info("PgBouncer: %s", f"console {p['console']} answers and has database {p['database']}" if p["ok"]
                 else f"NOT usable: {p['error']}")
    b = report["backup_dir"]
    log.info("Backup folder %s: %s free%s", b["path"], human_size(b["free_bytes"]),
             f", staging is {human_size(b['staging_bytes'])}" if b["staging_bytes"] is not None else "")
    for line in report["warnings"]:
        log.warning("WARNING: %s", line)
    log.info("Problems: %s", "none" if not report["problems"] else len(report["problems"]))
    for line in report["problems"]:
        log.info("  %s", line)


def handle(args, ctx: cli.Context) -> int:
    report = check(ctx)
    if ctx.json:
        ctx.emit_json(report)
    else:
        show(ctx, report)
    if report["problems"]:
        raise VerifyProblems(f"{len(report['problems'])} configuration problem(s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="setup_and_run.sh 2", description=__doc__)
    cli.common_flags(parser, destructive=False, machine=True)
    return cli.execute("check_configuration", parser, handle, argv)


if __name__ == "__main__":
    sys.exit(main())
