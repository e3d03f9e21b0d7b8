"""simple_rollback.py and the snapshot kind, on real servers (DESIGN §4-§6)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from common.pg.database import connect, rows
from tests import pgfixtures as pf
from tests.test_restore import MIGRATION, drop_all, leftovers

WARM_COPIES = "0"  # warm copies are tested in test_warm.py (tests/conftest.py env_for)


def snapshots(server, dbname):
    conn = connect(server.info)
    try:
        return [r[0] for r in rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                                   (dbname + "\\_snap\\_%",))]
    finally:
        conn.close()


@pytest.fixture
def staging(server):
    name = pf.create_database(server, pf.unique_name("staging"), pf.RICH_SCHEMA)
    yield name
    for snap in snapshots(server, name):
        pf.drop_database(server, snap)
    drop_all(server, name)


def create(env, description="snap"):
    result = pf.run_script("simple_rollback.py", "create", description, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_round_trip_and_two_restores_from_one_snapshot(server, staging, env_for):
    env = env_for(server, staging)
    before = pf.fingerprint(server, staging)
    point = create(env, "Before migration test")
    assert point["kind"] == "snapshot" and point["tables"]["sales.orders"] == 501
    assert pf.database_exists(server, point["snapshot_database"])
    for round_ in range(2):
        pf.execute(server, staging, MIGRATION)
        result = pf.run_script("simple_rollback.py", "restore", "--yes", env=env)
        assert result.returncode == 0, result.stderr
        assert "TEMPLATE" in result.stdout and "verification: OK" in result.stdout
        assert pf.fingerprint(server, staging) == before, f"restore {round_ + 1}"
    # the snapshot stays intact and sealed (no connections, so nobody can change it)
    assert pf.run_script("rollback_manager.py", "verify", "--file", point["id"], env=env).returncode == 0
    listed = pf.run_script("rollback_manager.py", "list", "--json", env=env)
    kinds = [(p["kind"], p["status"]) for p in json.loads(listed.stdout)["points"]]
    assert kinds == [("snapshot", "OK")]
    # quick_rollback takes the snapshot when it is the newest OK point
    pf.execute(server, staging, MIGRATION)
    assert pf.run_script("quick_rollback.py", "--yes", env=env).returncode == 0
    assert pf.fingerprint(server, staging) == before


def test_a_connected_client_is_cut_listed_and_connections_come_back(pg_old, env_for, tmp_path):
    name = pf.create_database(pg_old, pf.unique_name("staging"), "CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    try:
        env = env_for(pg_old, name)
        client = connect(pg_old.info, name, app="reporting-app")
        asked = pf.run_script("simple_rollback.py", "create", "cut", env=env)  # no terminal, no --yes
        assert asked.returncode == 3 and "reporting-app" in asked.stdout, asked.stdout + asked.stderr
        assert rows(client, "SELECT 1") == [(1,)] and snapshots(pg_old, name) == []  # never cut unasked
        result = pf.run_script("simple_rollback.py", "create", "cut", "--yes", env=env)
        assert result.returncode == 0, result.stderr
        assert "reporting-app" in result.stdout
        assert connect(pg_old.info, name).closed == 0  # staging accepts connections again
        client.close()
    finally:
        for snap in snapshots(pg_old, name):
            pf.drop_database(pg_old, snap)
        pf.drop_database(pg_old, name)


def test_a_failed_copy_leaves_staging_accepting_connections(pg_old, env_for, tmp_path):
    with pf.OwnedDatabase(pg_old, createdb=True) as (name, url):
        env = env_for(pg_old, name, STAGING_DATABASE_URL=url)
        superuser_session = connect(pg_old.info, name)  # a non-superuser may not cut it: the copy fails
        result = pf.run_script("simple_rollback.py", "create", "fails", "--yes", "--wait", "1", env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
        assert snapshots(pg_old, name) == []
        conn = connect(pg_old.info)
        assert rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)) == [(True,)]
        conn.close()
        superuser_session.close()


def test_a_role_without_createdb_gets_a_clear_error(pg_old, env_for):
    with pf.OwnedDatabase(pg_old, createdb=False) as (name, url):
        env = env_for(pg_old, name, STAGING_DATABASE_URL=url)
        result = pf.run_script("simple_rollback.py", "create", "x", env=env)
        assert result.returncode == 1 and "CREATEDB" in result.stderr and "Nothing was changed" in result.stderr
        assert snapshots(pg_old, name) == []


@pytest.mark.parametrize("step", ["restore-database-created", "restore-checked"])
def test_a_kill_during_the_copy_leaves_staging_whole(pg_old, env_for, tmp_path, step):
    name = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    try:
        env = env_for(pg_old, name)
        before = pf.fingerprint(pg_old, name)
        create(env)
        pf.execute(pg_old, name, MIGRATION)
        migrated = pf.fingerprint(pg_old, name)
        proc, _ = pf.start_paused("simple_rollback.py", "restore", "--yes", env=env, step=step, folder=tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert pf.fingerprint(pg_old, name) == migrated
        assert leftovers(pg_old, name, "restore"), "the kill left a restore database behind"
        again = pf.run_script("simple_rollback.py", "restore", "--yes", env=env)
        assert again.returncode == 0, again.stderr
        assert "left by an interrupted restore" in again.stderr
        assert leftovers(pg_old, name, "restore") == [] and pf.fingerprint(pg_old, name) == before
    finally:
        for snap in snapshots(pg_old, name):
            pf.drop_database(pg_old, snap)
        drop_all(pg_old, name)


def test_missing_orphan_drop_and_cleanup(pg_old, env_for, tmp_path):
    name = pf.create_database(pg_old, pf.unique_name("staging"), "CREATE TABLE t (id int);")
    try:
        env = env_for(pg_old, name)
        gone, kept = create(env, "gone"), create(env, "kept")
        pf.drop_database(pg_old, gone["snapshot_database"])
        # An orphan is a snapshot this toolkit made for this BACKUP_DIR whose sidecar is gone; a database
        # someone else named like a snapshot is not one, and is never dropped.
        made = create(env, "orphaned")
        (Path(env["BACKUP_DIR"]) / f"{made['id']}.json").unlink()
        orphan = made["snapshot_database"]
        lookalike = f"{name}_snap_20200101_000000_000"
        pf.create_database(pg_old, lookalike)
        listed = json.loads(pf.run_script("simple_rollback.py", "list", "--json", env=env).stdout)
        status = {p["description"]: p["status"] for p in listed["snapshots"]}
        assert status == {"gone": "MISSING", "kept": "OK"} and listed["orphans"] == [orphan]
        refused = pf.run_script("simple_rollback.py", "drop", lookalike, "--yes", env=env)
        assert refused.returncode != 0 and pf.database_exists(pg_old, lookalike)
        pf.drop_database(pg_old, lookalike)
        table = pf.run_script("simple_rollback.py", "list", env=env).stdout
        assert "MISSING" in table and f"orphan snapshot database (no sidecar): {orphan}" in table
        missing = pf.run_script("simple_rollback.py", "restore", gone["snapshot_database"], "--yes", env=env)
        assert missing.returncode == 1 and "MISSING" in missing.stderr
        assert pf.run_script("simple_rollback.py", "drop", orphan, "--yes", env=env).returncode == 0
        assert not pf.database_exists(pg_old, orphan)

        # cleanup: the old snapshot goes with its database; the newest OK one stays
        old = create(env, "old")
        sidecar = Path(env["BACKUP_DIR"]) / f"{old['id']}.json"
        meta = json.loads(sidecar.read_text())
        meta["created_at"] = "2020-01-01T00:00:00+00:00"
        sidecar.write_text(json.dumps(meta))
        done = pf.run_script("rollback_manager.py", "cleanup", "--older-than", "30", "--yes", env=env)
        assert done.returncode == 0, done.stderr
        assert not sidecar.exists() and not pf.database_exists(pg_old, old["snapshot_database"])
        assert pf.database_exists(pg_old, kept["snapshot_database"])
        dropped = pf.run_script("simple_rollback.py", "drop", kept["snapshot_database"], "--yes", env=env)
        assert dropped.returncode == 0 and not pf.database_exists(pg_old, kept["snapshot_database"])
    finally:
        for snap in snapshots(pg_old, name):
            pf.drop_database(pg_old, snap)
        drop_all(pg_old, name)


def test_no_client_tools_snapshot_fallback_then_quick_rollback(pg_new, env_for, tmp_path):
    name = pf.create_database(pg_new, pf.unique_name("staging"), pf.RICH_SCHEMA)
    try:
        python, extra = pf.python_without_postgres_wheels(tmp_path)
        env = env_for(pg_new, name, PATH="/nonexistent", **extra)
        del env["PG_BIN_DIR"]
        before = pf.fingerprint(pg_new, name)
        made = pf.run_script("create_rollback_point.py", "no tools", env=env, python=python)
        assert made.returncode == 0 and "server-side snapshot" in made.stderr, made.stdout + made.stderr
        pf.execute(pg_new, name, MIGRATION)
        result = pf.run_script("quick_rollback.py", "--yes", env=env, python=python)
        assert result.returncode == 0, result.stderr
        assert pf.fingerprint(pg_new, name) == before
    finally:
        for snap in snapshots(pg_new, name):
            pf.drop_database(pg_new, snap)
        drop_all(pg_new, name)


def test_a_snapshot_changed_behind_our_back_is_caught(pg_old, env_for):
    name = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    try:
        env = env_for(pg_old, name)
        point = create(env)
        snap = point["snapshot_database"]
        conn = connect(pg_old.info)
        assert rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (snap,)) == [(False,)]
        assert pf.run_script("rollback_manager.py", "verify", "--file", point["id"], env=env).returncode == 0
        conn.cursor().execute(f'ALTER DATABASE "{snap}" ALLOW_CONNECTIONS true')
        conn.close()
        pf.execute(pg_old, snap, "DELETE FROM sales.orders WHERE id > 10")
        bad = pf.run_script("rollback_manager.py", "verify", "--file", point["id"], env=env)
        assert bad.returncode == 4 and "changed since it was made" in bad.stderr
        before = pf.fingerprint(pg_old, name)
        refused = pf.run_script("simple_rollback.py", "restore", "--yes", env=env)
        assert refused.returncode == 1 and "differs from the rollback point" in refused.stderr
        assert pf.fingerprint(pg_old, name) == before and leftovers(pg_old, name, "restore") == []
    finally:
        for snap in snapshots(pg_old, name):
            pf.drop_database(pg_old, snap)
        drop_all(pg_old, name)
