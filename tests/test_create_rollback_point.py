"""create_rollback_point.py and the backup approaches, run as users run them, on real servers."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from common.locks import lock_key
from common.pg.database import connect
from tests import pgfixtures as pf

WARM_COPIES = "0"  # warm copies are tested in test_warm.py (tests/conftest.py env_for)


def sidecars(backups: Path):
    return sorted(backups.glob("*.json"))


def restore_into_scratch(server, dump: Path) -> str:
    scratch = pf.create_database(server, pf.unique_name("scratch"))
    subprocess.run([pf.tool(server, "pg_restore"), "--exit-on-error", "-d", scratch, str(dump)],
                   env=pf.libpq_env(server.info, scratch), check=True, capture_output=True)
    return scratch


def test_rollback_point_restores_to_the_same_schema_and_rows(server, rich_db, env_for, tmp_path):
    result = pf.run_script("create_rollback_point.py", "Before migration test", env=env_for(server, rich_db))
    assert result.returncode == 0, result.stderr
    backups = tmp_path / "backups"
    [sidecar] = sidecars(backups)
    meta = json.loads(sidecar.read_text())
    dump = backups / meta["file"]
    assert meta["description"] == "Before migration test" and meta["database"] == rich_db
    assert meta["kind"] == "dump" and meta["method"] == "pg_dump"
    assert meta["tool_version"].split(".")[0] == str(server.major)
    assert meta["size_bytes"] == dump.stat().st_size
    assert meta["sha256"] == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert meta["tables"] == {"public.customers": 203, "sales.orders": 501, "audit.events": 2}
    assert dump.name.startswith(f"{rich_db}_") and "Before-migration-test" in dump.name
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600 and stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    assert not list(backups.glob("*.partial"))
    for word in (meta["id"], str(dump), "pg_dump", meta["tool_version"]):
        assert word in result.stdout

    scratch = restore_into_scratch(server, dump)
    try:
        assert pf.fingerprint(server, scratch) == pf.fingerprint(server, rich_db)
    finally:
        pf.drop_database(server, scratch)


def test_points_from_every_script_are_listed_by_all(pg_old, rich_old, env_for, tmp_path):
    server = pg_old
    info = server.info
    env = env_for(server, rich_old, DB_HOST=info.host, DB_PORT=str(info.port), DB_NAME=rich_old,
                  DB_USER=info.user, DB_PASSWORD=info.password)
    assert pf.run_script("database_rollback.py", "backup", env=env).returncode == 0
    assert pf.run_script("create_rollback_point.py", "second", env=env).returncode == 0
    listed = pf.run_script("rollback_manager.py", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    points = json.loads(listed.stdout)["points"]
    assert [p["description"] for p in points] == ["second", ""]
    assert all(p["status"] == "OK" for p in points)
    table = pf.run_script("rollback_manager.py", pf.url(server, "v2"), pf.url(server, rich_old), "list", env=env)
    assert table.returncode == 0 and table.stdout.count(" OK") == 2
    assert info.password not in table.stdout + table.stderr


def test_a_database_name_with_capitals_a_space_and_a_quote(pg_old, env_for, tmp_path):
    name = 'Stage "Q" DB'
    pf.create_database(pg_old, name, "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);")
    try:
        result = pf.run_script("create_rollback_point.py", "odd name", env=env_for(pg_old, name))
        assert result.returncode == 0, result.stderr
        [sidecar] = sidecars(tmp_path / "backups")
        meta = json.loads(sidecar.read_text())
        assert meta["database"] == name and meta["tables"] == {"public.t": 2}
        assert sidecar.name.startswith("Stage-Q-DB_")
        scratch = restore_into_scratch(pg_old, tmp_path / "backups" / meta["file"])
        assert pf.row_fingerprint(pg_old, scratch) == pf.row_fingerprint(pg_old, name)
        pf.drop_database(pg_old, scratch)
    finally:
        pf.drop_database(pg_old, name)


def test_two_points_in_the_same_second_never_collide(pg_old, rich_old, env_for, tmp_path):
    env = env_for(pg_old, rich_old)
    for _ in range(3):
        assert pf.run_script("create_rollback_point.py", "same", env=env).returncode == 0
    assert len(sidecars(tmp_path / "backups")) == 3
    assert len(list((tmp_path / "backups").glob("*.dump"))) == 3


def _blocked_backup(server, dbname, env):
    """A backup whose pg_dump waits on a lock we hold, so the test can kill it mid-way."""
    blocker = connect(server.info, dbname, autocommit=False)
    blocker.cursor().execute("LOCK TABLE sales.orders IN ACCESS EXCLUSIVE MODE")
    proc = pf.start_script("create_rollback_point.py", "doomed", env=env)
    deadline = time.monotonic() + 30
    dump_pid = None
    while time.monotonic() < deadline and dump_pid is None:
        dump_pid = next((c for c in pf.children(proc.pid) if "pg_dump" in pf.cmdline(c)
                         and "--version" not in pf.cmdline(c)), None)
        time.sleep(0.05)
    assert dump_pid, "pg_dump did not start"
    return proc, dump_pid, blocker


def test_a_killed_pg_dump_leaves_nothing_listed_as_ok(pg_old, rich_old, env_for, tmp_path):
    env = env_for(pg_old, rich_old)
    proc, dump_pid, blocker = _blocked_backup(pg_old, rich_old, env)
    os.kill(dump_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    blocker.rollback()
    blocker.close()
    assert proc.returncode == 1
    assert "nothing was written" in err
    backups = tmp_path / "backups"
    assert list(backups.iterdir()) == []
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
    assert listed == []


def test_a_killed_script_leaves_an_incomplete_point_and_its_pg_dump_dies(pg_old, rich_old, env_for, tmp_path):
    env = env_for(pg_old, rich_old)
    proc, dump_pid, blocker = _blocked_backup(pg_old, rich_old, env)
    partial = tmp_path / "backups"
    deadline = time.monotonic() + 10
    while not list(partial.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{dump_pid}") and "pg_dump" in pf.cmdline(dump_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pg_dump" not in pf.cmdline(dump_pid), "pg_dump outlived the killed script"
    blocker.rollback()
    blocker.close()
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
    assert listed and all(p["status"] == "INCOMPLETE" for p in listed)
    # the next backup of the same database succeeds and is the only OK point
    assert pf.run_script("create_rollback_point.py", "after", env=env).returncode == 0
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
    assert [p["description"] for p in listed if p["status"] == "OK"] == ["after"]


def test_the_newer_server_with_older_tools_on_path_uses_pg_bin_dir(pg_new, new_bindir, env_for, tmp_path):
    db = pf.create_database(pg_new, pf.unique_name("vnew"), pf.RICH_SCHEMA)
    try:
        env = env_for(pg_new, db, PG_BIN_DIR=new_bindir)
        result = pf.run_script("create_rollback_point.py", "on the newer major", env=env)
        assert result.returncode == 0, result.stderr
        [sidecar] = sidecars(tmp_path / "backups")
        meta = json.loads(sidecar.read_text())
        major = f"{pg_new.major}."
        assert meta["tool_version"].startswith(major) and meta["server_version"].startswith(major)
        assert new_bindir in meta["tool"]
    finally:
        pf.drop_database(pg_new, db)


def test_the_tool_search_picks_the_first_binary_of_the_server_s_major(pg_old, pg_new):
    """find_tool stops at the first candidate of the server's major (each further one costs a
    --version run): the pick must still be that first one, whichever major's folder comes first."""
    from common.pg.pgtools import candidates, find_tool

    for server in (pg_old, pg_new):
        for first in (pg_old.bindir, pg_new.bindir, None):
            for name in ("pg_dump", "pg_restore", "psql"):
                every = candidates(name, first)
                exact = [t for t in every if t.major == server.major]
                if not exact and first != server.bindir:
                    continue  # a pip-installed major is found only through its own PG_BIN_DIR
                assert exact, f"no {name} {server.major} among {every}"
                assert find_tool(name, server.major, first) == exact[0], (name, server.major, first)


def test_no_usable_pg_dump_is_a_clear_error_or_a_snapshot(pg_new, pg_old, env_for, tmp_path):
    db = pf.create_database(pg_new, pf.unique_name("vnew"), "CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    try:
        # only the older major's tools, as the machine's, and a Python without the PostgreSQL wheels
        python, extra = pf.python_without_postgres_wheels(tmp_path)
        env = env_for(pg_new, db, PG_BIN_DIR=pg_old.bindir, **extra)
        run = lambda *a: pf.run_script(*a, env=env, python=python)  # noqa: E731
        result = run("create_rollback_point.py", "no tools", "--method", "pg_dump")
        assert result.returncode == 1
        err = result.stderr
        assert f"pg_dump {pg_new.major} or newer" in err and f"found: {pg_old.major}." in err, err
        assert err.count("no usable pg_dump") == 1 and "was not touched" in err
        assert "Traceback" not in err
        assert not (tmp_path / "backups").exists() or list((tmp_path / "backups").glob("*.json")) == []
        docker = run("create_rollback_point.py", "no engine", "--method", "docker")
        assert docker.returncode == 1 and "Docker engine" in docker.stderr

        # without --method, every dump approach fails and the server-side snapshot steps in, saying so
        fallback = run("create_rollback_point.py", "fallback")
        assert fallback.returncode == 0, fallback.stderr
        assert "falling back to a server-side snapshot" in fallback.stderr
        [sidecar] = (tmp_path / "backups").glob("*.json")
        meta = json.loads(sidecar.read_text())
        assert meta["kind"] == "snapshot" and meta["tables"] == {"public.t": 1}
        assert pf.database_exists(pg_new, meta["snapshot_database"])
        pf.drop_database(pg_new, meta["snapshot_database"])
    finally:
        pf.drop_database(pg_new, db)


def test_the_password_never_leaks(pg_old, env_for, tmp_path):
    password = "p@ss:w/rd#Secret1"
    role = pf.unique_name("role")
    db = pf.unique_name("secret")
    pf.execute(pg_old, "postgres", f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    pf.execute(pg_old, "postgres", f"CREATE DATABASE {db} OWNER {role}")
    pf.execute(pg_old, db, f"SET ROLE {role}; CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    from urllib.parse import quote
    staging = f"postgresql://{role}:{quote(password, safe='')}@127.0.0.1:{pg_old.info.port}/{db}"
    try:
        env = env_for(pg_old, db, STAGING_DATABASE_URL=staging)
        blocker = connect(pg_old.info, db, autocommit=False)
        blocker.cursor().execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        proc = pf.start_script("create_rollback_point.py", "secret", env=env)
        argv_seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("--format=custom" in a for a in argv_seen):
            argv_seen = [pf.cmdline(c) for c in pf.children(proc.pid)]
            time.sleep(0.05)
        blocker.rollback()
        blocker.close()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert any("--format=custom" in a for a in argv_seen)
        for text in argv_seen + [out, err]:
            assert password not in text and quote(password, safe="") not in text
        for path in list((tmp_path / "logs").glob("*.log")) + list((tmp_path / "backups").glob("*.json")):
            content = path.read_text()
            assert password not in content and quote(password, safe="") not in content, path
        listed = pf.run_script("rollback_manager.py", "list", "--json", env=env)
        assert password not in listed.stdout + listed.stderr
    finally:
        pf.drop_database(pg_old, db)
        pf.execute(pg_old, "postgres", f"DROP ROLE {role}")


@pytest.mark.parametrize("case", ["missing", "refused", "silent", "wrong_password"])
def test_connection_problems_are_one_clear_line(pg_old, env_for, tmp_path, case):
    import socket
    listener = None
    env = env_for(pg_old, "postgres")
    if case == "missing":
        del env["STAGING_DATABASE_URL"]
    elif case == "refused":
        env["STAGING_DATABASE_URL"] = f"postgresql://postgres:x@127.0.0.1:{_closed_port()}/staging"
    elif case == "silent":  # accepts TCP but never answers: must time out, not hang
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        env["STAGING_DATABASE_URL"] = f"postgresql://postgres:x@127.0.0.1:{listener.getsockname()[1]}/staging"
    else:
        env["STAGING_DATABASE_URL"] = pf.url(pg_old, "postgres").replace(pg_old.info.password, "wrong-password")
    started = time.monotonic()
    result = pf.run_script("create_rollback_point.py", "x", env=env, timeout=60)
    elapsed = time.monotonic() - started
    if listener:
        listener.close()
    assert result.returncode == (2 if case == "missing" else 1)
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert elapsed < 30
    if case == "missing":
        assert "STAGING_DATABASE_URL=" in result.stderr
    elif case == "wrong_password":
        assert "password authentication failed" in result.stderr and "wrong-password" not in result.stderr
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").iterdir())


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_operation_on_the_same_database_is_refused_naming_the_holder(pg_old, rich_old, env_for, tmp_path):
    holder = connect(pg_old.info, "postgres", app="rollback-toolkit/quick_rollback pid=4242")
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (lock_key(rich_old),))
    try:
        result = pf.run_script("create_rollback_point.py", "blocked", env=env_for(pg_old, rich_old))
    finally:
        holder.close()
    assert result.returncode == 1
    assert "quick_rollback pid=4242" in result.stderr and "Nothing was changed" in result.stderr
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").glob("*.json"))


def test_under_a_steady_write_load_the_dump_and_its_counts_agree(pg_old, rich_old, env_for, tmp_path):
    """pg_dump imports the snapshot our counting transaction exported: the sidecar's counts describe
    exactly the rows in the dump, while another process keeps inserting and staging keeps serving."""
    import threading

    stop = threading.Event()
    inserted = []

    def writer():
        conn = connect(pg_old.info, rich_old)
        while not stop.is_set():
            conn.cursor().execute("INSERT INTO sales.orders (customer_id, total) VALUES (1, 1.00)")
            inserted.append(1)
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        results = [pf.run_script("create_rollback_point.py", f"under load {n}", env=env_for(pg_old, rich_old))
                   for n in range(3)]
    finally:
        stop.set()
        thread.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len(inserted) > 50, "the writer kept writing during the backups"
    for sidecar in sidecars(tmp_path / "backups"):
        meta = json.loads(sidecar.read_text())
        scratch = restore_into_scratch(pg_old, tmp_path / "backups" / meta["file"])
        try:
            restored = {k: v[0] for k, v in pf.row_fingerprint(pg_old, scratch).items() if "." in k and k in meta["tables"]}
            assert restored == meta["tables"]
        finally:
            pf.drop_database(pg_old, scratch)
