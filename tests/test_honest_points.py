"""A point listed OK is one this machine can restore, and making one never cuts a client unasked
(DESIGN §4): pip's client tools, restorability, the snapshot fallback's question, replaced
databases' retention, and `list` with the server down."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.pg.database import ConnInfo, connect, rows
from tests import pgfixtures as pf
from tests.realistic import RealisticDatabase, database_fingerprint, differences

HIDE = str(pf.ROOT / ".ci" / "without-system-postgres")


def hidden(argv: list) -> list:
    """argv run as on a machine without Debian's PostgreSQL (a private mount namespace; an ordinary
    user gets one inside a user namespace)."""
    return ([] if os.geteuid() == 0 else ["unshare", "-r"]) + [HIDE, *argv]


def run_hidden(script: str, *args: str, env: dict, python: tuple) -> subprocess.CompletedProcess:
    return subprocess.run(hidden([*python, str(pf.ROOT / script), *args]), env=env, capture_output=True, text=True,
                          timeout=300, cwd="/", stdin=subprocess.DEVNULL)


def points(env, python=None) -> list:
    listed = pf.run_script("rollback_manager.py", "list", "--json", env=env, python=python or ())
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)["points"]


def test_with_only_pip_s_tools_a_point_is_a_dump_and_the_application_is_never_cut(pg_old, env_for):
    """No Debian PostgreSQL visible: the wheels' client tools are found, the point is a dump (not a
    snapshot that would cut the application), and the rollback is exact."""
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        del env["PG_BIN_DIR"]
        app = connect(ConnInfo.parse(rd.url), app="application")
        before = database_fingerprint(pg_old, rd.name)
        made = run_hidden("create_rollback_point.py", "pip tools only", env=env, python=(sys.executable,))
        assert made.returncode == 0, made.stdout + made.stderr
        assert "pginstall/bin/pg_dump" in made.stdout and "snapshot" not in made.stdout + made.stderr
        assert rows(app, "SELECT 1") == [(1,)]  # the application's session survived
        app.close()
        rd.migrate()
        quick = run_hidden("quick_rollback.py", "--yes", env=env, python=(sys.executable,))
        assert quick.returncode == 0, quick.stdout + quick.stderr
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []


def test_a_point_made_by_a_newer_pg_dump_restores_exactly_into_the_older_server(pg_old, pg_new, env_for, tmp_path):
    """pg_dump 18 of a PostgreSQL 15 (or 16) server: its pg_restore sets transaction_timeout, which
    the server does not know; the restore goes through pg_restore's script into psql without it."""
    python, extra = pf.python_without_postgres_wheels(tmp_path)
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url, PG_BIN_DIR=pg_new.bindir, **extra)
        before = database_fingerprint(pg_old, rd.name)
        made = run_hidden("create_rollback_point.py", "by 18", env=env, python=python)
        assert made.returncode == 0, made.stdout + made.stderr
        [point] = points(env, python)
        assert point["tool_version"].startswith(f"{pg_new.major}.") and point["status"] == "OK" and point["warm"]
        assert "through" in point["restore_with"] and "psql" in point["restore_with"]
        rd.migrate()
        quick = run_hidden("quick_rollback.py", "--yes", "--no-warm", env=env, python=python)
        assert quick.returncode == 0, quick.stdout + quick.stderr
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []


def test_a_point_nothing_here_can_restore_is_not_ok_and_the_rollback_takes_the_newest_usable(pg_old, rich_old,
                                                                                               env_for):
    env = env_for(pg_old, rich_old)
    before = pf.fingerprint(pg_old, rich_old)
    for description in ("usable", "newer"):
        made = pf.run_script("create_rollback_point.py", description, "--no-warm", env=env)
        assert made.returncode == 0, made.stderr
    newer = next(p for p in points(env) if p["description"] == "newer")
    sidecar = Path(newer["sidecar"])
    meta = json.loads(sidecar.read_text())
    meta["tool_version"] = "99.0"  # written by a pg_dump newer than any pg_restore on this machine
    meta["created_at"] = "2099-01-01T00:00:00+00:00"  # the newest, even when both were made in one second
    sidecar.write_text(json.dumps(meta))
    listed = {p["description"]: p for p in points(env)}
    assert listed["newer"]["status"] == "UNRESTORABLE" and "pg_restore 99 or newer" in listed["newer"]["problem"]
    assert listed["usable"]["status"] == "OK" and listed["usable"]["restore_with"].startswith("pg_restore")
    info = pf.run_script("rollback_manager.py", "info", "--file", listed["usable"]["id"], env=env)
    assert "restore with:   pg_restore" in info.stdout
    pf.execute(pg_old, rich_old, "DELETE FROM sales.orders WHERE id > 10")
    quick = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert f"Skipping rollback point {newer['id']}: UNRESTORABLE" in quick.stderr
    assert f"Roll {rich_old} back to {listed['usable']['id']}?" in quick.stdout
    assert pf.fingerprint(pg_old, rich_old) == before


def test_the_snapshot_fallback_asks_before_cutting_a_session(pg_old, pg_new, env_for, tmp_path):
    python, extra = pf.python_without_postgres_wheels(tmp_path)
    name = pf.create_database(pg_new, pf.unique_name("staging"), "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    try:
        env = env_for(pg_new, name, PG_BIN_DIR=pg_old.bindir, **extra)  # no pg_dump for this server
        app = connect(pg_new.info, name, app="application")
        asked = pf.run_script("create_rollback_point.py", "needs a snapshot", env=env, python=python)
        assert asked.returncode == 3, asked.stdout + asked.stderr
        assert "application" in asked.stdout and "--yes" in asked.stderr
        assert rows(app, "SELECT count(*) FROM t") == [(1,)]  # not cut
        assert points(env, python) == []
        app.close()
    finally:
        conn = connect(pg_new.info)
        for (snap,) in rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s", (name + "%",)):
            pf.drop_database(pg_new, snap)
        conn.close()


def test_replaced_databases_keep_the_two_newest_and_list_shows_their_disk(pg_old, rich_old, env_for):
    env = env_for(pg_old, rich_old)
    made = pf.run_script("create_rollback_point.py", "before", env=env)
    assert made.returncode == 0, made.stderr
    kept = []
    for n in range(5):
        pf.execute(pg_old, rich_old, f"DELETE FROM sales.orders WHERE id > {400 - n}")
        quick = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert quick.returncode == 0, quick.stdout + quick.stderr
        if n >= 2:
            assert "older replaced databases dropped (ROLLBACK_KEEP_REPLACED)" in quick.stdout
        conn = connect(pg_old.info)
        kept = [r[0] for r in rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1 DESC",
                                   (rich_old + "\\_\\_pre\\_rollback\\_%",))]
        conn.close()
        assert len(kept) == min(n + 1, 2)
    listed = pf.run_script("rollback_manager.py", "list", env=env)
    assert all(name in listed.stdout for name in kept) and "Disk held by the toolkit" in listed.stdout
    held = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["server"]
    assert [r["database"] for r in held["replaced"]] == kept and held["total_bytes"] > held["dump_bytes"] > 0
    none_kept = pf.run_script("quick_rollback.py", "--yes", env=dict(env, ROLLBACK_KEEP_REPLACED="0"))
    assert none_kept.returncode == 0
    conn = connect(pg_old.info)
    assert rows(conn, "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                (rich_old + "\\_\\_pre\\_rollback\\_%",)) == [(0,)]
    conn.close()


@pytest.fixture
def stopped_server(tmp_path):
    from common.testing.testserver import ThrowawayServer
    from tests.pgfixtures import OLD
    server = ThrowawayServer(OLD).start()
    try:
        yield server
    finally:
        server.stop()


def test_list_with_the_server_down_says_so_and_shows_server_items_as_unknown(stopped_server, env_for):
    server = stopped_server
    name = pf.create_database(server, pf.unique_name("staging"), pf.RICH_SCHEMA)
    env = env_for(server, name)
    assert pf.run_script("create_rollback_point.py", "warm one", env=env).returncode == 0
    assert pf.run_script("simple_rollback.py", "create", "snap", env=env).returncode == 0
    server.stop()
    result = pf.run_script("rollback_manager.py", "list", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the server cannot be reached" in result.stdout and "unknown" in result.stdout
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)
    by_kind = {p["kind"]: p["status"] for p in listed["points"]}
    assert by_kind == {"snapshot": "UNKNOWN", "dump": "OK"} and listed["server"]["reachable"] is False


def test_durations_cover_the_whole_run(pg_old, rich_old, env_for):
    env = env_for(pg_old, rich_old)
    made = pf.run_script("create_rollback_point.py", "timed", env=env)
    assert made.returncode == 0, made.stderr
    [point] = points(env)
    line = next(line for line in made.stdout.splitlines() if "duration:" in line)
    assert "dump" in line and "warm copy" in line
    assert point["duration_seconds"] > 0 and point["warm"]
