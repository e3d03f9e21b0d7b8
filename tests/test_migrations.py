"""database_rollback.py migrate / status / rollback against real servers (DESIGN §7)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.pg.database import connect, rows
from common.testing.demo import SAMPLE_DATA
from tests import pgfixtures as pf

ROOT = Path(__file__).resolve().parent.parent
SEED = SAMPLE_DATA  # the demo's sample rows: customers, and orders from 2023 on


def state(server, dbname):
    """Schema and rows, without the tracking table's timestamps; plus the applied versions."""
    schema, tables = pf.fingerprint(server, dbname)
    tables.pop("public.schema_migrations", None)
    conn = connect(server.info, dbname)
    versions = [v for (v,) in rows(conn, "SELECT version FROM public.schema_migrations ORDER BY 1")]
    conn.close()
    return schema, tables, versions


@pytest.fixture
def target(pg_old, tmp_path):
    """A database, the DB_* variables for it, and a copy of the shipped migrations."""
    name = pf.create_database(pg_old, pf.unique_name("app"))
    folder = tmp_path / "migrations"
    shutil.copytree(ROOT / "examples" / "migrations", folder)
    info = pg_old.info
    env = pf.script_env(tmp_path, DB_HOST=info.host, DB_PORT=str(info.port), DB_NAME=name, DB_USER=info.user,
                        ROLLBACK_WARM_COPIES="0", DB_PASSWORD=info.password, MIGRATIONS_DIR=str(folder), PG_BIN_DIR=pg_old.bindir)
    yield name, env, folder
    pf.drop_database(pg_old, name)


def migrate(env, *args):
    result = pf.run_script("database_rollback.py", "migrate", *args, "--yes", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def reference(pg_old, env, upto):
    """A fresh database migrated to `upto` (seeded after 001, as the target was)."""
    name = pf.create_database(pg_old, pf.unique_name("ref"))
    ref_env = dict(env, DB_NAME=name)
    migrate(ref_env, "001")
    pf.execute(pg_old, name, SEED)
    if upto != "001":
        migrate(ref_env, upto)
    return name


def test_migrate_rollback_and_migrate_again_match_fresh_databases(pg_old, target):
    name, env, _ = target
    migrate(env, "001")
    pf.execute(pg_old, name, SEED)
    migrate(env)
    status = json.loads(pf.run_script("database_rollback.py", "status", "--json", env=env).stdout)
    assert status["head"] == "003" and {m["state"] for m in status["migrations"]} == {"applied"}
    conn = connect(pg_old.info, name)
    assert rows(conn, "SELECT count(*) FROM orders_archive")[0][0] > 0  # 003 really moved data
    conn.close()

    result = pf.run_script("database_rollback.py", "rollback", "001_initial_schema", "--yes", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reverted 003_archive_old_orders" in result.stdout and "Automatic rollback point" in result.stdout
    only_001 = reference(pg_old, env, "001")
    try:
        assert state(pg_old, name) == state(pg_old, only_001)
    finally:
        pf.drop_database(pg_old, only_001)
    points = [p for p in json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
              if p["database"] == name]  # (the reference databases' migrations took points of their own)
    assert points[0]["migration_head"] == "003" and "automatic before rollback" in points[0]["description"]

    migrate(env)
    all_applied = reference(pg_old, env, "003")
    try:
        assert state(pg_old, name) == state(pg_old, all_applied)
    finally:
        pf.drop_database(pg_old, all_applied)


def test_rollback_by_version_and_status_lists_pending(pg_old, target):
    name, env, _ = target
    migrate(env, "001")
    pf.execute(pg_old, name, SEED)
    migrate(env, "002_order_status")
    status = pf.run_script("database_rollback.py", "status", env=env)
    assert "003_archive_old_orders" in status.stdout and "pending" in status.stdout and "head: 002" in status.stdout
    assert pf.run_script("database_rollback.py", "rollback", "001", "--yes", env=env).returncode == 0
    assert state(pg_old, name)[2] == ["001"]


def test_a_failing_down_script_stops_at_a_boundary(pg_old, target):
    name, env, folder = target
    migrate(env, "001")
    pf.execute(pg_old, name, SEED)
    migrate(env)
    down = folder / "002_order_status.down.sql"
    down.write_text("DROP INDEX orders_status_idx;\nSELECT 1 / 0;\n")
    result = pf.run_script("database_rollback.py", "rollback", "001", "--yes", env=env)
    assert result.returncode == 1
    assert "002_order_status.down.sql failed" in result.stderr and "division by zero" in result.stderr
    assert "database_rollback.py restore" in result.stderr
    at_002 = reference(pg_old, env, "002")
    try:
        assert state(pg_old, name) == state(pg_old, at_002)  # 003 reverted, 002 whole: index still there
    finally:
        pf.drop_database(pg_old, at_002)


@pytest.mark.parametrize("problem", ["missing_down", "edited", "unknown", "not_applied"])
def test_refusals_change_nothing(pg_old, target, problem):
    name, env, folder = target
    migrate(env, "001")
    pf.execute(pg_old, name, SEED)
    assert pf.run_script("create_rollback_point.py", "at 001", env=dict(env, STAGING_DATABASE_URL=pf.url(pg_old, name))
                         ).returncode == 0
    migrate(env, "002")
    goal = "001"
    if problem == "missing_down":
        (folder / "002_order_status.down.sql").unlink()
    elif problem == "edited":
        (folder / "002_order_status.sql").write_text("-- edited\n" + (folder / "002_order_status.sql").read_text())
    elif problem == "unknown":
        goal = "042_nothing"
    else:
        goal = "003"
    before = state(pg_old, name)
    points_before = sorted(p.name for p in Path(env["BACKUP_DIR"]).glob("*.json"))
    result = pf.run_script("database_rollback.py", "rollback", goal, "--yes", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Nothing was changed" in result.stderr
    assert state(pg_old, name) == before
    assert sorted(p.name for p in Path(env["BACKUP_DIR"]).glob("*.json")) == points_before
    if problem == "missing_down":
        assert "002_order_status.down.sql" in result.stderr
        # the newest point whose head is 001: the one migrate took before applying 002
        assert "database_rollback.py restore" in result.stderr
        assert "automatic-before-migrating-to-002" in result.stderr, result.stderr
    if problem == "edited":
        assert "edited" in result.stderr


def test_a_failing_migration_rolls_back_whole_and_stops(pg_old, target):
    name, env, folder = target
    (folder / "004_broken.sql").write_text("CREATE TABLE half_done (id int);\nSELECT no_such_function();\n")
    (folder / "005_never.sql").write_text("CREATE TABLE never (id int);\n")
    result = pf.run_script("database_rollback.py", "migrate", "--yes", env=env)
    assert result.returncode == 1 and "004_broken.sql failed" in result.stderr
    conn = connect(pg_old.info, name)
    assert rows(conn, "SELECT to_regclass('half_done'), to_regclass('never')") == [(None, None)]
    assert [v for (v,) in rows(conn, "SELECT version FROM schema_migrations ORDER BY 1")] == ["001", "002", "003"]
    conn.close()


def test_missing_folder_and_alembic_are_clear_errors(pg_old, target, tmp_path):
    name, env, _ = target
    result = pf.run_script("database_rollback.py", "status", env=dict(env, MIGRATIONS_DIR=str(tmp_path / "nope")))
    assert result.returncode == 2 and "MIGRATIONS_DIR" in result.stderr
    pf.execute(pg_old, name, "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
    result = pf.run_script("database_rollback.py", "rollback", "001", "--yes", env=env)
    assert result.returncode == 2 and "alembic downgrade" in result.stderr


def test_migrate_during_a_rollback_is_refused(pg_old, target, tmp_path):
    name, env, _ = target
    migrate(env, "001")
    pf.execute(pg_old, name, SEED)
    migrate(env)
    first, _ = pf.start_paused("database_rollback.py", "rollback", "001", "--yes", env=env,
                               step="rollback-point-taken", folder=tmp_path)
    second = pf.run_script("database_rollback.py", "migrate", "--yes", env=env)
    first.kill()
    first.communicate()
    assert second.returncode == 1 and "held by" in second.stderr and "database_rollback" in second.stderr
    assert state(pg_old, name)[2] == ["001", "002", "003"]


def test_migrate_names_the_folder_asks_and_takes_a_point_first(pg_old, target):
    name, env, folder = target
    asked = pf.run_script("database_rollback.py", "migrate", env=env)  # no terminal, no --yes
    assert asked.returncode == 3 and str(folder) in asked.stdout and "001_initial_schema" in asked.stdout
    conn = connect(pg_old.info, name)
    assert rows(conn, "SELECT to_regclass('public.schema_migrations')") == [(None,)]  # nothing applied
    conn.close()
    done = migrate(env, "001")
    assert "Automatic rollback point" in done.stdout
    unset = pf.run_script("database_rollback.py", "status", env={k: v for k, v in env.items() if k != "MIGRATIONS_DIR"})
    assert unset.returncode == 2 and "MIGRATIONS_DIR is not set" in unset.stderr and "samples" in unset.stderr
