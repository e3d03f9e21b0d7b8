"""quick_rollback.py, reset_staging.py and the restore commands: never half-done (DESIGN §5)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

from common.pg.database import connect, databases_like, rows
from tests import pgfixtures as pf

MIGRATION = """
ALTER TABLE public.customers ADD COLUMN vip boolean DEFAULT false;
UPDATE public.customers SET name = upper(name), vip = true WHERE id % 2 = 0;
DELETE FROM sales.orders WHERE id > 400;
DROP TABLE audit.events CASCADE;
CREATE TABLE public.migrated (id int PRIMARY KEY, note text);
INSERT INTO public.migrated SELECT i, 'row ' || i FROM generate_series(1, 50) i;
SELECT setval('sales.orders_id_seq', 9999);
"""


def make_point(env, description="before migration", *more):
    result = pf.run_script("create_rollback_point.py", description, *more, env=env)
    assert result.returncode == 0, result.stderr
    [sidecar] = [p for p in (Path(env["BACKUP_DIR"])).glob("*.json") if description.replace(" ", "-") in p.name]
    return json.loads(sidecar.read_text()), sidecar


def leftovers(server, dbname, tag):
    conn = connect(server.info)
    try:
        return databases_like(conn, f"{dbname}__{tag}_")
    finally:
        conn.close()


def drop_all(server, dbname):
    for tag in ("pre_rollback", "restore"):
        for name in leftovers(server, dbname, tag):
            pf.drop_database(server, name)
    pf.drop_database(server, dbname)


@pytest.fixture
def staging(server):
    name = pf.create_database(server, pf.unique_name("staging"), pf.RICH_SCHEMA)
    yield name
    drop_all(server, name)


@pytest.fixture
def staging_old(pg_old):
    name = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    yield name
    drop_all(pg_old, name)


def test_quick_rollback_restores_schema_and_every_row(server, staging, env_for):
    env = env_for(server, staging)
    before = pf.fingerprint(server, staging)
    make_point(env)
    pf.execute(server, staging, MIGRATION)
    migrated = pf.fingerprint(server, staging)
    assert migrated != before

    result = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert pf.fingerprint(server, staging) == before
    [kept] = leftovers(server, staging, "pre_rollback")
    assert pf.fingerprint(server, kept) == migrated
    assert leftovers(server, staging, "restore") == []
    out = result.stdout
    assert "verification: OK" in out and "was unavailable for" in out and "before migration" in out
    conn = connect(server.info)
    assert rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (staging,)) == [(True,)]
    conn.close()


def test_reset_staging_makes_staging_equal_to_v2_and_only_reads_v2(server, staging, env_for):
    v2 = pf.create_database(server, pf.unique_name("v2"), pf.RICH_SCHEMA + MIGRATION)
    try:
        v2_before = pf.fingerprint(server, v2)
        watcher = connect(server.info, v2)  # a production client: must not be cut
        env = env_for(server, staging, V2_DATABASE_URL=pf.url(server, v2))
        result = pf.run_script("reset_staging.py", "--yes", env=env)
        assert result.returncode == 0, result.stderr
        assert pf.fingerprint(server, staging) == v2_before
        assert pf.fingerprint(server, v2) == v2_before
        assert rows(watcher, "SELECT 1") == [(1,)]
        watcher.close()
        assert "fresh copy of V2" in result.stdout
        assert not list(Path(env["BACKUP_DIR"]).glob("**/*.dump")), "the temporary V2 dump is removed"
    finally:
        pf.drop_database(server, v2)


def test_a_reset_whose_copy_fails_midway_leaves_staging_unchanged(server, env_for):
    """A data stream fails (V2's rows hold characters staging's LATIN1 encoding lacks): the
    other streams are stopped, the half-filled copy is dropped, staging is as it was."""
    staging = pf.unique_name("staging")
    pf.execute(server, "postgres", f"CREATE DATABASE {staging} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
                                   "TEMPLATE template0")
    pf.execute(server, staging, "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (1), (2);")
    v2 = pf.create_database(server, pf.unique_name("v2"), pf.RICH_SCHEMA + MIGRATION)  # rows beyond Latin-1
    try:
        before = pf.fingerprint(server, staging)
        env = env_for(server, staging, V2_DATABASE_URL=pf.url(server, v2))
        result = pf.run_script("reset_staging.py", "--yes", env=env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "copying V2 failed" in result.stderr and "LATIN1" in result.stderr
        assert "Traceback" not in result.stderr
        assert pf.fingerprint(server, staging) == before
        assert leftovers(server, staging, "restore") == [] and leftovers(server, staging, "pre_rollback") == []
        assert not [p for p in Path(env["BACKUP_DIR"]).rglob("*") if p.is_file() and p.parent.name == ".tmp"]
    finally:
        drop_all(server, staging)
        pf.drop_database(server, v2)


def test_quick_rollback_without_points_offers_the_reset_and_from_v2_forces_it(pg_old, staging_old, env_for):
    v2 = pf.create_database(pg_old, pf.unique_name("v2"), "CREATE TABLE only_in_v2 (id int); INSERT INTO only_in_v2 VALUES (7);")
    try:
        env = env_for(pg_old, staging_old, V2_DATABASE_URL=pf.url(pg_old, v2))
        declined = pf.run_script("quick_rollback.py", env=env)
        assert declined.returncode == 3 and "reset of staging from V2" in declined.stdout
        assert pf.row_fingerprint(pg_old, staging_old)["public.customers"][0] == 203
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stderr
        assert pf.fingerprint(pg_old, staging_old) == pf.fingerprint(pg_old, v2)
    finally:
        pf.drop_database(pg_old, v2)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar_checksum"])
def test_a_damaged_backup_is_refused_before_staging_is_touched(pg_old, staging_old, env_for, damage):
    env = env_for(pg_old, staging_old)
    meta, sidecar = make_point(env)
    dump = sidecar.with_suffix(".dump")
    pf.execute(pg_old, staging_old, MIGRATION)
    migrated = pf.fingerprint(pg_old, staging_old)
    if damage == "flip":
        data = bytearray(dump.read_bytes())
        data[len(data) // 2] ^= 0xFF
        dump.write_bytes(bytes(data))
    elif damage == "truncate":
        with open(dump, "r+b") as fh:
            fh.truncate(dump.stat().st_size // 2)
    else:
        meta["sha256"] = "0" * 64
        sidecar.write_text(json.dumps(meta))
    result = pf.run_script("rollback_manager.py", "restore", "--file", str(dump), "--yes", env=env)
    assert result.returncode == 1
    assert "CORRUPT" in result.stderr and "Nothing was changed" in result.stderr
    assert pf.fingerprint(pg_old, staging_old) == migrated
    assert leftovers(pg_old, staging_old, "restore") == [] and leftovers(pg_old, staging_old, "pre_rollback") == []
    # quick_rollback refuses it too (no V2 is configured here, so its reset fallback cannot run either)
    quick = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert quick.returncode in (1, 2) and "Traceback" not in quick.stderr
    assert pf.fingerprint(pg_old, staging_old) == migrated


def test_a_session_with_an_open_transaction_and_a_lock_is_listed_and_cut(pg_old, staging_old, env_for):
    env = env_for(pg_old, staging_old)
    before = pf.fingerprint(pg_old, staging_old)
    make_point(env)
    pf.execute(pg_old, staging_old, MIGRATION)
    client = connect(pg_old.info, staging_old, autocommit=False, app="busy-app")
    client.cursor().execute("LOCK TABLE public.customers IN ACCESS EXCLUSIVE MODE")
    result = pf.run_script("quick_rollback.py", "--yes", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "busy-app" in result.stdout and "connections cut: 1" in result.stdout
    with pytest.raises(psycopg2.OperationalError):
        client.cursor().execute("SELECT 1")
    assert pf.fingerprint(pg_old, staging_old) == before


@pytest.mark.parametrize("step", ["restore-database-created", "restore-filled", "restore-checked",
                                  "restore-connections-cut", "restore-swapped"])
def test_a_kill_at_any_step_leaves_staging_old_or_new_and_the_next_run_completes(pg_old, staging_old, env_for, tmp_path, step):
    env = env_for(pg_old, staging_old)
    before = pf.fingerprint(pg_old, staging_old)
    make_point(env)
    pf.execute(pg_old, staging_old, MIGRATION)
    migrated = pf.fingerprint(pg_old, staging_old)
    proc, _ = pf.start_paused("quick_rollback.py", "--yes", env=env, step=step, folder=tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    state = pf.fingerprint(pg_old, staging_old) if step != "restore-connections-cut" else None
    if state is not None:
        assert state in (before, migrated)
    # the next run cleans up, re-allows connections and completes
    result = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert pf.fingerprint(pg_old, staging_old) == before
    assert leftovers(pg_old, staging_old, "restore") == []
    conn = connect(pg_old.info)
    allowed = rows(conn, "SELECT datname, datallowconn FROM pg_database WHERE datname LIKE %s "
                         "AND datname NOT LIKE %s", (staging_old + "%", "%\\_\\_warm\\_%"))  # warm copies stay sealed
    conn.close()
    assert all(ok for _, ok in allowed), allowed


def test_without_a_terminal_and_without_yes_nothing_changes(pg_old, staging_old, env_for):
    env = env_for(pg_old, staging_old)
    make_point(env)
    pf.execute(pg_old, staging_old, MIGRATION)
    migrated = pf.fingerprint(pg_old, staging_old)
    result = pf.run_script("quick_rollback.py", env=env)
    assert result.returncode == 3 and "--yes" in result.stderr
    assert pf.fingerprint(pg_old, staging_old) == migrated
    assert leftovers(pg_old, staging_old, "pre_rollback") == []


def test_two_restores_at_once_exactly_one_runs(pg_old, staging_old, env_for, tmp_path):
    env = env_for(pg_old, staging_old)
    before = pf.fingerprint(pg_old, staging_old)
    make_point(env)
    pf.execute(pg_old, staging_old, MIGRATION)
    first, _ = pf.start_paused("quick_rollback.py", "--yes", env=env, step="restore-filled", folder=tmp_path)
    second = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert second.returncode == 1 and "held by" in second.stderr and "quick_rollback" in second.stderr
    first.kill()
    first.communicate(timeout=30)
    assert pf.run_script("quick_rollback.py", "--yes", env=env).returncode == 0
    assert pf.fingerprint(pg_old, staging_old) == before


def test_a_backup_of_another_database_needs_force(pg_old, staging_old, env_for, tmp_path):
    other = pf.create_database(pg_old, pf.unique_name("other"), "CREATE TABLE x (id int); INSERT INTO x VALUES (1);")
    try:
        meta, sidecar = make_point(env_for(pg_old, other), "other db")
        env = env_for(pg_old, staging_old)
        before = pf.fingerprint(pg_old, staging_old)
        refused = pf.run_script("rollback_manager.py", "restore", "--file", str(sidecar.with_suffix(".dump")),
                                "--yes", env=env)
        assert refused.returncode == 2 and "--force" in refused.stderr
        assert pf.fingerprint(pg_old, staging_old) == before
        forced = pf.run_script("rollback_manager.py", "restore", "--file", meta["id"], "--yes", "--force", env=env)
        assert forced.returncode == 0, forced.stderr
        assert pf.fingerprint(pg_old, staging_old) == pf.fingerprint(pg_old, other)
    finally:
        pf.drop_database(pg_old, other)


def test_a_role_without_createdb_restores_in_place_in_one_transaction(pg_old, env_for, tmp_path):
    role, password = pf.unique_name("owner"), "owner-secret-1"
    name = pf.unique_name("staging")
    pf.execute(pg_old, "postgres", f"CREATE ROLE {role} LOGIN NOCREATEDB PASSWORD '{password}'")
    pf.execute(pg_old, "postgres", f"CREATE DATABASE {name} OWNER {role}")
    pf.execute(pg_old, name, f"SET ROLE {role}; CREATE SCHEMA app AUTHORIZATION {role}; SET search_path = app;"
               "CREATE TABLE app.items (id int PRIMARY KEY, label text); "
               "INSERT INTO app.items SELECT i, 'item ' || i FROM generate_series(1, 100) i;")
    try:
        url = f"postgresql://{role}:{password}@127.0.0.1:{pg_old.info.port}/{name}"
        env = env_for(pg_old, name, STAGING_DATABASE_URL=url)
        before = pf.fingerprint(pg_old, name)
        make_point(env)
        pf.execute(pg_old, name, f"SET ROLE {role}; DELETE FROM app.items WHERE id > 10; "
                               "CREATE TABLE app.added (x int); CREATE SCHEMA extra; ")
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stderr
        assert "in place" in result.stdout
        assert pf.fingerprint(pg_old, name) == before
    finally:
        pf.drop_database(pg_old, name)
        pf.execute(pg_old, "postgres", f"DROP ROLE {role}")


def test_database_rollback_restore_verify_and_cleanup(pg_old, staging_old, env_for, tmp_path):
    env = env_for(pg_old, staging_old)
    del env["STAGING_DATABASE_URL"]
    info = pg_old.info
    env.update(DB_HOST=info.host, DB_PORT=str(info.port), DB_NAME=staging_old, DB_USER=info.user, DB_PASSWORD=info.password)
    before = pf.fingerprint(pg_old, staging_old)
    backup = pf.run_script("database_rollback.py", "backup", "--json", env=env)
    assert backup.returncode == 0, backup.stderr
    dump = json.loads(backup.stdout)["path"]
    verify = pf.run_script("database_rollback.py", "verify", "--json", env=env)
    assert verify.returncode == 0, verify.stderr
    report = json.loads(verify.stdout)
    assert report["drift"] == [] and report["ok"] and report["tables"]["sales.orders"] == 501
    pf.execute(pg_old, staging_old, MIGRATION)
    drift = json.loads(pf.run_script("database_rollback.py", "verify", "--json", env=env).stdout)["drift"]
    assert "table audit.events is missing" in drift and "table public.migrated is not in the rollback point" in drift
    assert pf.run_script("database_rollback.py", "verify", "--strict", env=env).returncode == 4
    conn = connect(pg_old.info, staging_old)
    with pytest.raises(psycopg2.errors.UniqueViolation):
        conn.cursor().execute("CREATE UNIQUE INDEX CONCURRENTLY broken ON sales.orders (customer_id)")
    conn.close()
    bad = pf.run_script("database_rollback.py", "verify", env=env)
    assert bad.returncode == 4 and "invalid index: sales.broken" in bad.stdout

    restored = pf.run_script("database_rollback.py", "restore", dump, "--yes", env=env)
    assert restored.returncode == 0, restored.stderr
    assert pf.fingerprint(pg_old, staging_old) == before
    assert pf.run_script("database_rollback.py", "verify", "--strict", env=env).returncode == 0

    # cleanup: an old point and an old kept database go; the newest OK point stays
    for n in range(2):
        assert pf.run_script("database_rollback.py", "backup", f"extra {n}", env=env).returncode == 0
    sidecars = sorted(p for p in Path(env["BACKUP_DIR"]).glob("*.json") if not p.name.startswith("."))
    oldest = json.loads(sidecars[0].read_text())
    oldest["created_at"] = "2020-01-01T00:00:00+00:00"
    sidecars[0].write_text(json.dumps(oldest))
    old_db = f"{staging_old}__pre_rollback_20200101_000000_000"
    pf.create_database(pg_old, old_db)
    dry = pf.run_script("database_rollback.py", "cleanup", "30", "--dry-run", env=env)
    assert dry.returncode == 0 and oldest["id"] in dry.stdout and old_db in dry.stdout
    assert sidecars[0].exists() and pf.database_exists(pg_old, old_db)
    done = pf.run_script("database_rollback.py", "cleanup", "30", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert not sidecars[0].exists() and not Path(oldest["file"]).exists()
    assert not pf.database_exists(pg_old, old_db)
    assert all(p.exists() for p in sidecars[1:])
    assert leftovers(pg_old, staging_old, "pre_rollback"), "recent kept databases stay"
    env["STAGING_DATABASE_URL"] = pf.url(pg_old, staging_old)
    keep = pf.run_script("rollback_manager.py", "cleanup", "--keep", "1", "--yes", env=env)
    assert keep.returncode == 0, keep.stderr
    assert len([p for p in Path(env["BACKUP_DIR"]).glob("*.json") if not p.name.startswith(".")]) == 1


@pytest.mark.parametrize("script,args", [("quick_rollback.py", ["--yes"]), ("simple_rollback.py", ["create", "x"]),
                                         ("reset_staging.py", ["--yes"]), ("rollback_manager.py", ["reset", "--yes"])])
def test_nothing_touches_v2_even_when_staging_is_misconfigured_as_v2(pg_old, staging_old, env_for, script, args):
    env = env_for(pg_old, staging_old)
    make_point(env)
    watcher = connect(pg_old.info, staging_old, app="production-client")
    before = pf.fingerprint(pg_old, staging_old)
    # the same database as V2, spelled with localhost instead of 127.0.0.1
    env["V2_DATABASE_URL"] = pf.url(pg_old, staging_old).replace("127.0.0.1", "localhost")
    result = pf.run_script(script, *args, env=env)
    assert result.returncode == 2 and "same database" in result.stderr
    assert rows(watcher, "SELECT 1") == [(1,)]  # its connection was not cut
    watcher.close()
    assert pf.fingerprint(pg_old, staging_old) == before


@pytest.mark.parametrize("step", ["restore-swapped", "restore-connections-allowed", "restore-finishing"])
def test_a_failure_after_the_swap_is_reported_as_a_restore_that_happened(pg_old, staging_old, env_for, step):
    """Review defect 2: once the renames have committed, nothing later is 'the swap failed'."""
    env = env_for(pg_old, staging_old)
    before = pf.fingerprint(pg_old, staging_old)
    make_point(env)
    pf.execute(pg_old, staging_old, MIGRATION)
    result = pf.run_script("quick_rollback.py", "--yes", "--drop-previous", env=dict(env, ROLLBACK_TEST_FAIL_AT=step))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "swap failed" not in out and "is unchanged" not in out
    assert f"{staging_old} IS restored, but this did not finish" in out and f"injected at {step}" in out
    assert pf.fingerprint(pg_old, staging_old) == before
    # --drop-previous runs after these steps: a failure before it keeps the replaced database
    assert bool(leftovers(pg_old, staging_old, "pre_rollback")) == (step == "restore-finishing")
    assert leftovers(pg_old, staging_old, "restore") == []
    conn = connect(pg_old.info)
    assert rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (staging_old,)) == [(True,)]
    conn.close()


def test_a_session_that_cannot_be_cut_is_named_before_anyone_is_cut(pg_old, env_for):
    """Review defect 3: with a superuser's idle session on staging, --wait used to cut an
    application that reconnects again and again, then give up."""
    import threading
    import time

    from common.pg.database import ConnInfo
    with pf.OwnedDatabase(pg_old, createdb=True) as (name, url):
        owner = connect(ConnInfo.parse(url))
        rows(owner, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50) RETURNING 1")
        owner.close()
        env = env_for(pg_old, name, STAGING_DATABASE_URL=url)
        make_point(env)
        pf.execute(pg_old, name, "DELETE FROM t WHERE id > 10")
        migrated = pf.fingerprint(pg_old, name)
        blocker = connect(pg_old.info, name, app="superuser-idle")
        cuts, stop = [], threading.Event()

        def application():
            app = None
            while not stop.is_set():
                try:
                    app = app or connect(ConnInfo.parse(url), app="reconnecting-app")
                    rows(app, "SELECT count(*) FROM t")
                except Exception:  # cut, or refused while connections are disallowed
                    cuts.append(time.monotonic())
                    app = None
                time.sleep(0.02)
            if app is not None:
                app.close()

        thread = threading.Thread(target=application, daemon=True)
        thread.start()
        try:
            time.sleep(0.3)
            refused = pf.run_script("quick_rollback.py", "--yes", "--wait", "3", env=env)
            cut_while_refused = len(cuts)
        finally:
            stop.set()
            thread.join(10)
        out = refused.stdout + refused.stderr
        assert refused.returncode == 1, out
        assert "no session was cut" in out and f"pid {blocker.get_backend_pid()} " in out
        assert cut_while_refused == 0, "the application was cut by an operation that gave up"
        assert pf.fingerprint(pg_old, name) == migrated
        blocker.close()
        done = pf.run_script("quick_rollback.py", "--yes", "--wait", "3", env=env)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("command", [
    ("create_rollback_point.py", "after the kill"), ("database_rollback.py", "status"),
    ("rollback_manager.py", "list"), ("database_rollback.py", "verify"), ("simple_rollback.py", "list"),
    ("setup_and_run.sh", "2")], ids=lambda c: " ".join(c))
def test_every_command_gives_back_the_connections_a_killed_run_left_cut(pg_old, staging_old, env_for, tmp_path,
                                                                         command):
    """Review defect 4: after a kill with connections cut, read-only commands failed to connect."""
    import subprocess
    env = env_for(pg_old, staging_old)
    make_point(env, "first", "--no-warm")
    pf.execute(pg_old, staging_old, MIGRATION)
    proc, _ = pf.start_paused("quick_rollback.py", "--yes", env=env, step="restore-connections-cut", folder=tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    conn = connect(pg_old.info)
    assert rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (staging_old,)) == [(False,)]
    if command[0] == "setup_and_run.sh":
        result = subprocess.run([str(pf.ROOT / "setup_and_run.sh"), *command[1:]], env=env, capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
    else:
        result = pf.run_script(*command, env=env)
    out = result.stdout + result.stderr
    assert "left cut by an interrupted run: allowed again" in out, out
    assert "cannot connect" not in out, out
    assert rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (staging_old,)) == [(True,)]
    conn.close()
    assert not list(Path(env["BACKUP_DIR"]).glob(".inflight_*"))


def test_a_kill_during_a_snapshot_s_copy_is_repaired_by_a_listing(pg_old, staging_old, env_for, tmp_path):
    env = env_for(pg_old, staging_old)
    proc, _ = pf.start_paused("simple_rollback.py", "create", "killed", env=env, step="snapshot-copied",
                              folder=tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    result = pf.run_script("rollback_manager.py", "list", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allowed again" in result.stdout + result.stderr
    conn = connect(pg_old.info)
    assert rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (staging_old,)) == [(True,)]
    conn.close()


def _comment(server, name):
    conn = connect(server.info)
    try:
        return rows(conn, "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                    (name,))[0][0]
    finally:
        conn.close()


def test_a_reset_that_waited_at_its_prompt_keeps_staging_s_properties_as_they_are_under_the_lock(
        pg_old, staging_old, env_for, tmp_path):
    """Review defect 5: the reset set back the comment it had read before its confirmation."""
    v2 = pf.create_database(pg_old, pf.unique_name("v2"), pf.RICH_SCHEMA + MIGRATION)
    try:
        env = env_for(pg_old, staging_old, V2_DATABASE_URL=pf.url(pg_old, v2))
        pf.execute(pg_old, "postgres", f"COMMENT ON DATABASE {staging_old} IS 'at the point'")
        make_point(env)
        pf.execute(pg_old, "postgres", f"COMMENT ON DATABASE {staging_old} IS 'after the point'")
        reset, flag = pf.start_paused("reset_staging.py", "--yes", env=env, step="confirmed", folder=tmp_path)
        quick = pf.run_script("quick_rollback.py", "--yes", env=env)  # runs while the reset waits
        assert quick.returncode == 0, quick.stdout + quick.stderr
        assert _comment(pg_old, staging_old) == "at the point"
        flag.unlink()
        out, err = reset.communicate(timeout=120)
        assert reset.returncode == 0, out + err
        assert "Changed since the confirmation" in out and "another run changed them" in out
        assert _comment(pg_old, staging_old) == "at the point"
        assert pf.fingerprint(pg_old, staging_old) == pf.fingerprint(pg_old, v2)
    finally:
        pf.drop_database(pg_old, v2)


def test_a_point_deleted_while_the_restore_waited_is_refused_with_nothing_changed(pg_old, staging_old, env_for,
                                                                                  tmp_path):
    env = env_for(pg_old, staging_old)
    point, sidecar = make_point(env, "soon deleted", "--no-warm")
    pf.execute(pg_old, staging_old, MIGRATION)
    migrated = pf.fingerprint(pg_old, staging_old)
    proc, flag = pf.start_paused("quick_rollback.py", "--yes", env=env, step="confirmed", folder=tmp_path)
    deleted = pf.run_script("rollback_manager.py", "delete", "--file", point["id"], "--yes", env=env)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    flag.unlink()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert "deleted or changed since the confirmation" in err and "Nothing was changed" in err
    assert pf.fingerprint(pg_old, staging_old) == migrated
