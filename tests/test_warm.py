"""Warm copies (common/points/warm.py): every new dump point gets a sealed database holding exactly it, and
a rollback copies that server-side, falling back to the dump when it is missing or changed."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests import pgfixtures as pf
from tests.realistic import RealisticDatabase, database_fingerprint, differences


def points(env):
    listed = pf.run_script("rollback_manager.py", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["points"]


def make_point(env, description="before release", *more):
    made = pf.run_script("create_rollback_point.py", description, *more, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    return next(p for p in points(env) if p["description"] == description)


def seal(server, name):
    conn = pf.connect(server.info)
    try:
        found = pf.rows(conn, "SELECT datallowconn, oid, xmin::text FROM pg_database WHERE datname = %s", (name,))
        return found[0] if found else None
    finally:
        conn.close()


def warm_databases(server, staging):
    conn = pf.connect(server.info)
    try:
        return [r[0] for r in pf.rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                                      (staging + "\\_\\_warm\\_%",))]
    finally:
        conn.close()


@pytest.fixture
def realistic(server, env_for):
    with RealisticDatabase(server) as rd:
        yield rd, env_for(server, rd.name, STAGING_DATABASE_URL=rd.url)


def database_oid(server, name):
    conn = pf.connect(server.info)
    try:
        return pf.rows(conn, "SELECT oid FROM pg_database WHERE datname = %s", (name,))[0][0]
    finally:
        conn.close()


def test_a_new_point_is_warm_and_the_rollback_swaps_it_in_exactly_then_re_arms_it(server, realistic, tmp_path):
    rd, env = realistic
    before = database_fingerprint(server, rd.name)
    point = make_point(env)
    assert point["warm"] and point["warm_size_bytes"] > 0 and point["status"] == "OK"
    allowed, oid, xmin = seal(server, point["warm_database"])
    assert allowed is False and (oid, xmin) == (point["warm_oid"], point["warm_xmin"])
    listed = pf.run_script("rollback_manager.py", "list", env=env).stdout
    assert "WARM" in listed and point["id"] in listed
    for round_ in range(2):  # a second rollback right after the first swaps in the re-armed copy
        rd.migrate()
        result = pf.run_script("quick_rollback.py", "--yes", "--json", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        done = json.loads(result.stdout)
        assert done["method"].startswith("swap in the sealed warm copy") and done["proof"] == "sealed"
        assert any("proven unchanged" in n for n in done["notes"])
        assert done["warm_again"] is True and done["back_seconds"] < done["warm_again_seconds"]
        # The warm copy itself is staging now (same OID: nothing was copied), exact to the point.
        assert database_oid(server, rd.name) == oid, round_
        assert differences(before, database_fingerprint(server, rd.name)) == [], round_
        [again] = [p for p in points(env) if p["id"] == point["id"]]
        assert again["warm"] and again["warm_database"] != point["warm_database"]
        allowed, oid, xmin = seal(server, again["warm_database"])
        assert allowed is False and (oid, xmin) == (again["warm_oid"], again["warm_xmin"])
        assert warm_databases(server, rd.name) == [again["warm_database"]]
        point = again
    verified = pf.run_script("database_rollback.py", "verify", "--strict", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_second_rollback_during_the_re_arm_restores_the_dump_and_the_re_arm_still_ends_warm(pg_old, env_for,
                                                                                               tmp_path):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        point = make_point(env)
        rd.migrate()
        proc, flag = pf.start_paused("quick_rollback.py", "--yes", env=env, step="warm-created", folder=tmp_path)
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []  # served while re-arming
        rd.migrate()
        second = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "restored from the dump: the rollback point has no warm copy" in second.stdout
        assert "being re-armed by another run" in second.stdout + second.stderr
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        flag.unlink()
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
        assert "warm again:   yes" in out
        [again] = points(env)
        assert again["warm"] and warm_databases(pg_old, rd.name) == [again["warm_database"]]
        assert again["warm_database"] != point["warm_database"]


def test_a_warm_copy_changed_behind_the_tool_s_back_is_caught_and_the_dump_used(server, realistic):
    rd, env = realistic
    before = database_fingerprint(server, rd.name)
    name = make_point(env)["warm_database"]
    pf.execute(server, "postgres", f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    pf.execute(server, name, "DELETE FROM app.audit")  # a change no sidecar knows of
    pf.execute(server, "postgres", f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    rd.migrate()
    result = pf.run_script("rollback_manager.py", "restore", "--latest", "--yes", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "was changed since it was sealed" in result.stdout + result.stderr
    assert "restored from the dump" in result.stdout
    assert differences(before, database_fingerprint(server, rd.name)) == []


def test_a_dropped_warm_copy_falls_back_to_the_dump(pg_old, env_for):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        pf.drop_database(pg_old, make_point(env)["warm_database"])
        assert points(env)[0]["status"] == "OK"  # the dump is the point; the copy only a faster way
        rd.migrate()
        result = pf.run_script("database_rollback.py", "restore", str(next(Path(env["BACKUP_DIR"]).glob("*.dump"))),
                               "--yes", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "does not exist" in result.stdout + result.stderr and "restored from the dump" in result.stdout
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []


def test_no_warm_and_the_setting_turn_warm_copies_off(pg_old, env_for):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        assert not make_point(env, "flag", "--no-warm")["warm"]
        assert not make_point(dict(env, ROLLBACK_WARM_COPIES="0"), "setting")["warm"]
        assert warm_databases(pg_old, rd.name) == []
        make_point(env, "warm one")
        rd.migrate()
        result = pf.run_script("quick_rollback.py", "--yes", "--no-warm", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "restored from the dump: --no-warm" in result.stdout


def test_only_the_newest_points_stay_warm_and_cleanup_and_delete_remove_copies(pg_old, env_for):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        first = make_point(env, "first")
        second = make_point(env, "second")
        by_id = {p["id"]: p for p in points(env)}
        assert not by_id[first["id"]]["warm"] and by_id[second["id"]]["warm"]
        assert warm_databases(pg_old, rd.name) == [second["warm_database"]]
        keep_two = dict(env, ROLLBACK_WARM_COPIES="2")
        third = make_point(keep_two, "third")
        assert warm_databases(pg_old, rd.name) == sorted([second["warm_database"], third["warm_database"]])
        deleted = pf.run_script("rollback_manager.py", "delete", "--file", second["id"], "--yes", env=env)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        assert warm_databases(pg_old, rd.name) == [third["warm_database"]]
        cleaned = pf.run_script("rollback_manager.py", "cleanup", "--keep", "1", "--yes", env=env)
        assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
        assert warm_databases(pg_old, rd.name) == [third["warm_database"]]  # the newest OK point stays whole
        assert [p["id"] for p in points(env)] == [third["id"]]


@pytest.mark.parametrize("step", ["warm-created", "warm-sealed", "warm-recorded"])
def test_a_kill_while_making_a_warm_copy_leaves_an_ok_point_or_nothing_half_made(pg_old, env_for, tmp_path, step):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        proc, flag = pf.start_paused("create_rollback_point.py", "killed", env=env, step=step, folder=tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        flag.unlink()
        [point] = points(env)
        assert point["status"] == "OK" and point["warm"] == (step == "warm-recorded")
        # The next run removes a copy that no sidecar names, and the rollback is exact either way.
        rd.migrate()
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        [now] = points(env)  # a warm point was swapped in, then re-armed under a new name
        assert now["warm"] == point["warm"]
        assert warm_databases(pg_old, rd.name) == ([now["warm_database"]] if now["warm"] else [])


@pytest.mark.parametrize("step", ["restore-database-created", "restore-connections-cut", "restore-swapped",
                                  "warm-created"])
def test_a_kill_at_any_step_of_a_swap_in_or_its_re_arm_leaves_staging_migrated_or_restored(pg_old, env_for,
                                                                                           tmp_path, step):
    """Before, between and after the renames, and during the re-arm: staging is never missing, and the
    next rollback is exact (from the dump when the kill left the point without its warm copy)."""
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        make_point(env)
        rd.migrate()
        migrated = database_fingerprint(pg_old, rd.name)
        proc, flag = pf.start_paused("quick_rollback.py", "--yes", env=env, step=step, folder=tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        flag.unlink()
        listed = pf.run_script("rollback_manager.py", "list", env=env)  # any command allows connections again
        assert listed.returncode == 0, listed.stdout + listed.stderr
        now = database_fingerprint(pg_old, rd.name)
        restored_already = step in ("restore-swapped", "warm-created")
        assert differences(before if restored_already else migrated, now) == []
        if restored_already:
            rd.migrate()
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "restored from the dump" in result.stdout  # the kill took the point's warm copy with it
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        assert warm_databases(pg_old, rd.name) == []  # nothing half-made is left
        assert not [n for n in pf.database_names(pg_old) if "__restore_" in n]
        warmed = pf.run_script("rollback_manager.py", "warm", env=env)
        assert warmed.returncode == 0, warmed.stdout + warmed.stderr
        [point] = points(env)
        assert point["warm"] and warm_databases(pg_old, rd.name) == [point["warm_database"]]
        again = pf.run_script("rollback_manager.py", "warm", "--json", env=env)  # warm already: nothing to do
        assert again.returncode == 0 and "Nothing was changed" in json.loads(again.stdout)["note"]
        assert points(env)[0]["warm_database"] == point["warm_database"]


def _pause_at(env, folder, *steps):
    """The environment of a run that pauses at each step in turn (common.testing.testhooks), and its flags."""
    flags = [folder / f"paused-at-{step}" for step in steps]
    spec = ";".join(f"{step}:{flag}" for step, flag in zip(steps, flags))
    return dict(env, ROLLBACK_TEST_PAUSE_AT=spec), flags


def _wait_for(flag, proc, seconds=120):
    import time
    deadline = time.monotonic() + seconds
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the run never reached {flag.name}"
        time.sleep(0.02)


def test_a_session_open_on_the_warm_copy_is_ended_by_the_seal_and_its_rows_never_reach_staging(pg_old, env_for,
                                                                                                tmp_path):
    """Review defect 1: a client connected while pg_restore filled the copy could write after the seal."""
    import psycopg2

    from common.pg.database import ConnInfo, connect
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        paused_env, (created, sealed) = _pause_at(env, tmp_path, "warm-created", "warm-sealed")
        proc = pf.start_script("create_rollback_point.py", "sealed", env=paused_env)
        _wait_for(created, proc)
        [name] = warm_databases(pg_old, rd.name)
        intruder = connect(ConnInfo.parse(rd.url).with_db(name), app="intruder")  # the owner's own role
        created.unlink()
        _wait_for(sealed, proc)
        with pytest.raises(psycopg2.Error):  # ended at the seal: it can change nothing any more
            intruder.cursor().execute("INSERT INTO app.audit (tbl, op, row_id, at) "
                                      "SELECT 'intruder', 'insert', i, now() FROM generate_series(1, 100) i")
        intruder.close()
        sealed.unlink()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        assert "Ended 1 session(s) connected to" in out + err
        [point] = points(env)
        assert point["warm"] and point["status"] == "OK"
        rd.migrate()
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "proven unchanged" in result.stdout
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []


def test_a_session_the_owner_may_not_end_leaves_the_point_without_a_warm_copy(pg_old, env_for, tmp_path):
    from common.pg.database import connect
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        proc, flag = pf.start_paused("create_rollback_point.py", "superuser inside", env=env, step="warm-created",
                                     folder=tmp_path)
        [name] = warm_databases(pg_old, rd.name)
        superuser = connect(pg_old.info, name, app="superuser-session")
        pid = superuser.get_backend_pid()
        flag.unlink()
        out, err = proc.communicate(timeout=120)
        superuser.close()
        assert proc.returncode == 0, out + err
        assert "cannot be sealed" in err and f"pid {pid} " in err
        [point] = points(env)
        assert point["status"] == "OK" and not point["warm"]
        rd.migrate()
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "restored from the dump" in result.stdout
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        assert warm_databases(pg_old, rd.name) == []  # the copy that could not be sealed is gone


def test_a_second_backup_dir_never_drops_the_first_one_s_warm_copies(pg_old, env_for, tmp_path):
    """Review defect 6: a copy is an orphan only when it carries this BACKUP_DIR's mark."""
    with RealisticDatabase(pg_old) as rd:
        first = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        second = dict(first, BACKUP_DIR=str(tmp_path / "other-backups"))
        before = database_fingerprint(pg_old, rd.name)
        a = make_point(first, "in the first folder")
        b = make_point(second, "in the second folder")
        a2 = make_point(first, "first folder again")  # prunes the first folder's older copy, and only that
        lookalike = f"{rd.name}__warm_20200101_000000_000"  # named like a copy, made by nobody here
        pf.create_database(pg_old, lookalike)
        make_point(second, "second folder again")
        assert set(warm_databases(pg_old, rd.name)) == {a2["warm_database"], lookalike,
                                                        points(second)[0]["warm_database"]}
        assert a["warm_database"] not in warm_databases(pg_old, rd.name)
        assert b["warm_database"] not in warm_databases(pg_old, rd.name)
        rd.migrate()
        result = pf.run_script("quick_rollback.py", "--yes", env=first)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "swap in the sealed warm copy" in result.stdout and "proven unchanged" in result.stdout
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        assert pf.database_exists(pg_old, lookalike)


def test_a_rollback_that_fails_before_its_swap_gives_the_warm_copy_back_sealed(pg_old, env_for):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        point = make_point(env)
        rd.migrate()
        migrated = database_fingerprint(pg_old, rd.name)
        failed = pf.run_script("quick_rollback.py", "--yes", env=dict(env, ROLLBACK_TEST_FAIL_AT="restore-checked"))
        assert failed.returncode != 0
        assert "given back to point" in failed.stdout + failed.stderr
        assert differences(migrated, database_fingerprint(pg_old, rd.name)) == []
        [now] = points(env)
        assert now["warm"] and now["warm_database"] == point["warm_database"]
        allowed, oid, xmin = seal(pg_old, now["warm_database"])
        assert allowed is False and (oid, xmin) == (now["warm_oid"], now["warm_xmin"]) and oid == point["warm_oid"]
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "swap in the sealed warm copy" in result.stdout
        assert database_oid(pg_old, rd.name) == oid
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
