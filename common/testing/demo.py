"""`./setup_and_run.sh demo`: the whole workflow on a throwaway PostgreSQL, with real output.

V2 and staging are created, a rollback point is made, a sample migration is applied to staging,
quick_rollback.py restores staging, verify proves it matches the rollback point; then the server
is stopped and every temporary folder removed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import quote

from ..env import PROJECT_ROOT
from ..pg.database import connect, execute
from .testserver import ThrowawayServer

SAMPLE_DATA = """
INSERT INTO customers (full_name, email, created_at) VALUES
  ('Ada Lovelace', 'ada@example.com', '2023-01-05'), ('Grace Hopper', 'grace@example.com', '2023-03-09'),
  ('Zoë Ångström', 'zoe@example.com', '2024-02-01');
INSERT INTO orders (customer_id, total_cents, placed_at)
  SELECT 1 + i % 3, i * 137 % 100000, timestamptz '2023-06-01' + i * interval '1 day'
  FROM generate_series(1, 400) AS i;
"""


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(env: dict, *argv: str) -> None:
    shown = " ".join(a if " " not in a else repr(a) for a in argv)
    print(f"$ python3 {shown}", flush=True)
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / argv[0]), *argv[1:]], env=env, cwd=str(PROJECT_ROOT))
    if result.returncode != 0:
        raise SystemExit(f"demo step failed (exit {result.returncode}): {shown}")


def main() -> int:
    warnings.filterwarnings("ignore")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rollback-demo-"))
    server = ThrowawayServer()
    try:
        step("Starting a throwaway PostgreSQL server")
        server.start()
        info = server.info
        print(f"PostgreSQL {server.major} on 127.0.0.1:{info.port}, data in {server.base or 'a container'}")
        base = f"postgresql://{quote(info.user or 'postgres')}:{quote(info.password or '', safe='')}@127.0.0.1:{info.port}"
        env = dict(os.environ, ENV_FILE=str(work / "demo.env"), BACKUP_DIR=str(work / "backups"),
                   LOG_DIR=str(work / "logs"), V2_DATABASE_URL=f"{base}/demo_v2",
                   STAGING_DATABASE_URL=f"{base}/demo_staging", MIGRATIONS_DIR=str(PROJECT_ROOT / "examples" / "migrations"))
        if server.bindir:
            env["PG_BIN_DIR"] = server.bindir

        step("V2 (production stand-in): migrations 001-002 and sample data")
        admin = connect(info)
        execute(admin, "CREATE DATABASE demo_v2")
        admin.close()
        v2_env = dict(env, STAGING_DATABASE_URL=env["V2_DATABASE_URL"], BACKUP_DIR=str(work / "v2_backups"))
        run(v2_env, "database_rollback.py", "migrate", "001", "--yes")
        v2 = connect(info, "demo_v2")
        execute(v2, SAMPLE_DATA)
        v2.close()
        run(v2_env, "database_rollback.py", "migrate", "002", "--yes")

        step("Staging: a fresh copy of V2")
        run(env, "reset_staging.py", "--yes")

        step("Before the migration: a rollback point of staging")
        run(env, "create_rollback_point.py", "Before migration test")
        run(env, "rollback_manager.py", "list")

        step("The migration: 003 moves old orders to an archive table")
        run(env, "database_rollback.py", "migrate", "--yes")
        run(env, "database_rollback.py", "status")

        step("It went wrong: quick rollback")
        run(env, "quick_rollback.py", "--yes")

        step("Proof: staging's content and schema are identical to the rollback point it was restored from "
             "(every row's hash, every object's definition; exit 4 if not)")
        run(env, "database_rollback.py", "verify", "--strict")
        run(env, "database_rollback.py", "status")
    finally:
        step("Cleaning up")
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        print(f"Throwaway server stopped and {work} removed ({time.monotonic() - started:.0f} s in all).")
    print("\nDemo complete. The same commands work against your databases once .env names them (see README.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
