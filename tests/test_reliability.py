"""Kill it, starve it, stop its server: staging is as it was or exactly the rollback point, no
backup is silently wrong, and every failure is one clear line (issue: reliability)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.testing.testserver import ThrowawayServer
from tests import pgfixtures as pf
from tests.test_restore import MIGRATION, drop_all, leftovers, make_point


@pytest.fixture
def own_server():
    """A server of this test's own, which the test may stop and start."""
    server = ThrowawayServer(pf.OLD).start()
    yield server
    server.stop()


def without_sequence_positions(fingerprint):
    """Crash recovery moves sequences up to 32 values ahead (PostgreSQL pre-logs them), so after an
    immediate stop sequence positions are not part of "as it was"; schema and rows are."""
    schema, tables = fingerprint
    return schema, {k: v for k, v in tables.items() if not isinstance(v[1], bool)}


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("step", ["restore-filled", "restore-connections-cut"])
def test_a_server_stop_in_the_middle_of_a_restore(own_server, env_for, tmp_path, mode, step):
    server = own_server
    name = pf.create_database(server, "staging", pf.RICH_SCHEMA)
    env = env_for(server, name)
    before = pf.fingerprint(server, name)
    make_point(env)
    pf.execute(server, name, MIGRATION)
    migrated = pf.fingerprint(server, name)
    proc, flag = pf.start_paused("quick_rollback.py", "--yes", env=env, step=step, folder=tmp_path)
    server.pg_ctl("-m", mode, "stop")
    server.pg_ctl("start")
    flag.unlink()  # the run goes on, against a server that dropped all its sessions
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err
    if step == "restore-filled":
        assert "lost the connection to the database server" in err
    else:  # the swap itself met the dead session: staging unchanged, connections still cut until the next run
        assert "the swap failed" in err and "run this command again" in err
    server._wait_ready(30)
    if step == "restore-filled":  # before the swap: staging is exactly as it was
        assert without_sequence_positions(pf.fingerprint(server, name)) == without_sequence_positions(migrated)
    again = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert pf.fingerprint(server, name) == before
    assert leftovers(server, name, "restore") == []
    conn = pf.connect(server.info)
    assert all(ok for _, ok in pf.rows(conn, "SELECT datname, datallowconn FROM pg_database WHERE datname LIKE 'staging%' "
                                             "AND datname NOT LIKE '%\\_\\_warm\\_%'"))  # warm copies stay sealed
    conn.close()
    drop_all(server, name)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_server_stop_in_the_middle_of_a_backup(own_server, env_for, tmp_path, mode):
    server = own_server
    name = pf.create_database(server, "staging", pf.RICH_SCHEMA)
    env = env_for(server, name)
    proc, flag = pf.start_paused("create_rollback_point.py", "doomed", env=env, step="backup-dump-started",
                                 folder=tmp_path)
    server.pg_ctl("-m", mode, "stop")
    server.pg_ctl("start")
    flag.unlink()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, out + err
    backups = Path(env["BACKUP_DIR"])
    assert not list(backups.glob("*.json")) and not list(backups.glob("*.dump")) and not list(backups.glob("*.partial"))
    server._wait_ready(30)
    assert pf.run_script("create_rollback_point.py", "after the restart", env=env).returncode == 0
    points = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
    assert [(p["description"], p["status"]) for p in points] == [("after the restart", "OK")]


def test_a_backup_that_hits_a_file_size_limit_leaves_nothing(pg_old, env_for, tmp_path):
    name = pf.create_database(pg_old, pf.unique_name("big"), "CREATE TABLE blob AS SELECT i, md5(i::text) || md5((i * 7)::text) "
                              "AS v FROM generate_series(1, 100000) i;")
    try:
        env = env_for(pg_old, name)
        limit = 512 * 1024  # the dump is about 7 MB uncompressed

        def starve():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        result = subprocess.run([sys.executable, str(pf.ROOT / "create_rollback_point.py"), "starved"], env=env,
                                capture_output=True, text=True, preexec_fn=starve, timeout=120, cwd="/")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "disk is full" in result.stderr and "Traceback" not in result.stderr
        backups = Path(env["BACKUP_DIR"])
        assert sorted(p.name for p in backups.iterdir() if not p.name.startswith(".")) == []
        listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)
        assert listed["points"] == []
    finally:
        pf.drop_database(pg_old, name)


def test_a_dump_of_another_database_under_this_name_is_caught(pg_old, env_for, tmp_path):
    staging = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    other = pf.create_database(pg_old, pf.unique_name("other"), "CREATE TABLE x (id int); INSERT INTO x VALUES (1);")
    try:
        env = env_for(pg_old, staging)
        meta, sidecar = make_point(env)
        other_env = dict(env, STAGING_DATABASE_URL=pf.url(pg_old, other), BACKUP_DIR=str(tmp_path / "other"))
        _, other_sidecar = make_point(other_env, "other db")
        sidecar.with_suffix(".dump").write_bytes(other_sidecar.with_suffix(".dump").read_bytes())  # swapped file
        pf.execute(pg_old, staging, MIGRATION)
        migrated = pf.fingerprint(pg_old, staging)
        direct = pf.run_script("rollback_manager.py", "restore", "--file", meta["id"], "--yes", env=env)
        assert direct.returncode == 1 and "CORRUPT" in direct.stderr and "Nothing was changed" in direct.stderr
        quick = pf.run_script("quick_rollback.py", "--yes", env=env)  # no OK point left, and no V2 configured
        assert quick.returncode == 2 and "Skipping rollback point" in quick.stderr and "CORRUPT" in quick.stderr
        assert pf.fingerprint(pg_old, staging) == migrated and leftovers(pg_old, staging, "restore") == []
        verify = pf.run_script("rollback_manager.py", "verify", "--file", meta["id"], env=env)
        assert verify.returncode == 4 and ("size" in verify.stderr or "sha256" in verify.stderr)
    finally:
        drop_all(pg_old, staging)
        pf.drop_database(pg_old, other)


class SmallDisk:
    """A folder on a tmpfs of a given size. As root, mounted here (and unmounted after). As an
    ordinary user, mounted inside an unprivileged user and mount namespace that the script runs
    in (`python`: the prefix for pf.run_script), as that same user, never root; what the script
    left on it is listed from inside, before the namespace ends."""

    def __init__(self, folder: Path, megabytes: float):
        self.folder, self.size = folder, f"size={int(megabytes * 1024)}k,mode=0700"
        self.listing = folder.parent / f"{folder.name}.listing"
        if os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", self.size, "tmpfs", str(folder)], check=True,
                           capture_output=True)
            self.python = (sys.executable,)
        else:
            inner = (f'mount -t tmpfs -o {self.size} tmpfs "$0" || exit 97; '
                     f'unshare -U --map-user={os.getuid()} --map-group={os.getgid()} "$@"; rc=$?; '
                     f'ls -A "$0" > "{self.listing}"; exit $rc')
            self.python = ("unshare", "-rm", "sh", "-c", inner, str(folder), sys.executable)

    def left(self) -> list:
        if os.geteuid() == 0:
            return sorted(p.name for p in self.folder.iterdir())
        return self.listing.read_text().split()

    def unmount(self) -> None:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(self.folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(megabytes) -> a SmallDisk (see there)."""
    disks = []

    def make(megabytes: float) -> SmallDisk:
        folder = tmp_path / f"disk{len(disks)}"
        folder.mkdir()
        disks.append(SmallDisk(folder, megabytes))
        return disks[-1]

    yield make
    for disk in disks:
        disk.unmount()


def _big_database(server) -> str:
    return pf.create_database(server, pf.unique_name("big"), "CREATE TABLE blob AS SELECT i, md5(i::text) || "
                              "md5((i * 7)::text) AS v FROM generate_series(1, 100000) i; ANALYZE blob;")


@pytest.mark.parametrize("megabytes,says", [(1, "not enough disk space"), (6, "disk is full")])
def test_a_small_disk_is_refused_early_or_fails_cleanly(pg_old, env_for, small_disk, megabytes, says):
    """About 9 MB of table data: on 1 MB the backup refuses before writing; on 6 MB (more than half
    the estimate, so it starts) pg_dump runs out of space; either way nothing is left behind."""
    name = _big_database(pg_old)
    try:
        disk = small_disk(megabytes)
        env = env_for(pg_old, name, BACKUP_DIR=str(disk.folder))
        result = pf.run_script("create_rollback_point.py", "too big", env=env, python=disk.python)
        assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr
        assert disk.left() == []
        assert json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"] == []
    finally:
        pf.drop_database(pg_old, name)


@pytest.mark.parametrize("step", ["restore-filled", "restore-connections-cut", "restore-swapped"])
@pytest.mark.parametrize("command", ["reset_staging", "database_rollback_restore"])
def test_a_kill_at_any_step_of_a_reset_or_a_database_restore(pg_old, env_for, tmp_path, command, step):
    staging = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    v2 = pf.create_database(pg_old, pf.unique_name("v2"), pf.RICH_SCHEMA + MIGRATION)
    try:
        env = env_for(pg_old, staging, V2_DATABASE_URL=pf.url(pg_old, v2))
        if command == "reset_staging":
            argv, old, new = ["reset_staging.py", "--yes"], pf.fingerprint(pg_old, staging), pf.fingerprint(pg_old, v2)
        else:
            meta, _ = make_point(env)
            new = pf.fingerprint(pg_old, staging)
            pf.execute(pg_old, staging, MIGRATION)
            old = pf.fingerprint(pg_old, staging)
            argv = ["database_rollback.py", "restore", str(Path(env["BACKUP_DIR"]) / meta["file"]), "--yes"]
        proc, _ = pf.start_paused(*argv, env=env, step=step, folder=tmp_path)
        proc.kill()
        proc.communicate(timeout=30)
        if step != "restore-connections-cut":  # with connections cut, staging is unreachable until the next run
            assert pf.fingerprint(pg_old, staging) in (old, new)
        again = pf.run_script(*argv, env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert pf.fingerprint(pg_old, staging) == new
        assert leftovers(pg_old, staging, "restore") == []
        assert not list(Path(env["BACKUP_DIR"]).glob(".tmp/*.dump")), "the reset's V2 dump does not linger"
    finally:
        drop_all(pg_old, staging)
        pf.drop_database(pg_old, v2)


def test_a_backup_during_a_restore_is_refused(pg_old, env_for, tmp_path):
    staging = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    try:
        env = env_for(pg_old, staging)
        make_point(env)
        restore, flag = pf.start_paused("quick_rollback.py", "--yes", env=env, step="restore-filled", folder=tmp_path)
        backup = pf.run_script("create_rollback_point.py", "during the restore", env=env)
        snap = pf.run_script("simple_rollback.py", "create", "during the restore", env=env)
        flag.unlink()
        out, err = restore.communicate(timeout=120)
        assert restore.returncode == 0, out + err
        for refused in (backup, snap):
            assert refused.returncode == 1 and "held by" in refused.stderr and "quick_rollback" in refused.stderr
        points = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
        assert [p["description"] for p in points] == ["before migration"]
    finally:
        drop_all(pg_old, staging)


def test_a_kill_in_the_middle_of_pg_restore(pg_old, env_for, tmp_path):
    """The script is killed while its pg_restore child works: the child dies with it (no orphan
    writing on), staging is untouched, and the next run removes the half-filled database."""
    staging = _big_database(pg_old)
    try:
        env = env_for(pg_old, staging)
        before = pf.fingerprint(pg_old, staging)
        make_point(env, "big point", "--no-warm")  # a point without warm copy: the rollback runs pg_restore
        pf.execute(pg_old, staging, "DELETE FROM blob WHERE i > 10")
        changed = pf.fingerprint(pg_old, staging)
        proc = pf.start_script("quick_rollback.py", "--yes", env=env)
        deadline, child = time.monotonic() + 60, None
        while child is None and time.monotonic() < deadline:
            child = next((c for c in pf.children(proc.pid) if "pg_restore" in pf.cmdline(c)
                          and "--version" not in pf.cmdline(c) and "--list" not in pf.cmdline(c)), None)
            time.sleep(0.01)
        assert child, "pg_restore never started"
        proc.kill()
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while "pg_restore" in pf.cmdline(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "pg_restore" not in pf.cmdline(child), "pg_restore outlived the killed script"
        assert pf.fingerprint(pg_old, staging) == changed
        again = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert again.returncode == 0 and "left by an interrupted restore" in again.stderr, again.stderr
        assert pf.fingerprint(pg_old, staging) == before and leftovers(pg_old, staging, "restore") == []
    finally:
        drop_all(pg_old, staging)


def test_a_kill_between_the_dump_and_its_sidecar_leaves_no_ok_point(pg_old, env_for, tmp_path):
    staging = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    try:
        env = env_for(pg_old, staging)
        proc, _ = pf.start_paused("create_rollback_point.py", "killed", env=env, step="backup-dump-written",
                                  folder=tmp_path)
        proc.kill()
        proc.communicate(timeout=30)
        points = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
        assert [p["status"] for p in points] == ["INCOMPLETE"]  # a dump without sidecar is never offered
        assert pf.run_script("create_rollback_point.py", "next", env=env).returncode == 0
        quick = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert quick.returncode == 0 and "next" in quick.stdout
    finally:
        drop_all(pg_old, staging)


def test_a_kill_during_a_snapshot_copy_is_recovered_by_the_next_run(pg_old, env_for, tmp_path):
    staging = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    try:
        env = env_for(pg_old, staging)
        proc, _ = pf.start_paused("simple_rollback.py", "create", "killed", env=env, step="snapshot-copied",
                                  folder=tmp_path)
        proc.kill()
        proc.communicate(timeout=30)
        conn = pf.connect(pg_old.info)
        assert pf.rows(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (staging,)) == [(False,)]
        conn.close()
        made = pf.run_script("simple_rollback.py", "create", "next", env=env)
        assert made.returncode == 0 and "allowed again" in made.stderr, made.stderr
        listed = json.loads(pf.run_script("simple_rollback.py", "list", "--json", env=env).stdout)
        assert [p["description"] for p in listed["snapshots"]] == ["next"] and len(listed["orphans"]) == 1
        assert pf.run_script("simple_rollback.py", "drop", listed["orphans"][0], "--yes", env=env).returncode == 0
    finally:
        conn = pf.connect(pg_old.info)
        for (name,) in pf.rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s", (staging + "_snap%",)):
            pf.drop_database(pg_old, name)
        conn.close()
        drop_all(pg_old, staging)
