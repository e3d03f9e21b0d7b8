"""Behind PgBouncer (common/pg/pgbouncer.py): clients through the pooler wait during the swap instead of
failing; a killed run's pause is resumed by the next; a pooler that does not answer is refused."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from common.pg.database import ConnInfo, connect, scalar
from common.testing.testserver import free_port
from tests import pgfixtures as pf
from tests.bouncer import Bouncer
from tests.realistic import RealisticDatabase

BENCH_SCRIPT = r"""\set id random(1, 300)
BEGIN;
SELECT count(*) FROM app.orders WHERE customer_id = :id;
INSERT INTO app.audit (tbl, op, row_id, at) VALUES ('bench', 'insert', :id, now());
END;
"""


def through(bouncer: Bouncer, dbname: str, query: str):
    conn = connect(ConnInfo.parse(bouncer.url(dbname)))
    try:
        return scalar(conn, query)
    finally:
        conn.close()


@pytest.mark.parametrize("command", [("quick_rollback.py", "--yes"), ("simple_rollback.py", "restore", "--yes")],
                         ids=["quick_rollback", "simple_rollback"])
def test_pgbench_clients_through_pgbouncer_see_no_error_during_the_rollback(pg_old, env_for, tmp_path, command):
    server = pg_old
    with RealisticDatabase(server) as rd, Bouncer(server, {rd.name: (rd.owner, rd.password)}) as bouncer:
        env = env_for(server, rd.name, STAGING_DATABASE_URL=rd.url, PGBOUNCER_ADMIN_URL=bouncer.admin_url)
        make = ("simple_rollback.py", "create", "before") if command[0] == "simple_rollback.py" else \
            ("create_rollback_point.py", "before")
        made = pf.run_script(*make, env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        rd.migrate()
        assert through(bouncer, rd.name, "SELECT to_regclass('app.new_feature') IS NOT NULL")
        script = tmp_path / "bench.sql"
        script.write_text(BENCH_SCRIPT)
        bench_env = pf.libpq_env(ConnInfo.parse(bouncer.url(rd.name)), rd.name)
        bench = subprocess.Popen([pf.tool(server, "pgbench"), "-n", "-c", "4", "-T", "12", "-f", str(script)],
                                 env=bench_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(1.5)
            assert bench.poll() is None, bench.communicate()[0]
            result = pf.run_script(*command, env=env)
            running_at_end = bench.poll() is None
        finally:
            out = bench.communicate(timeout=60)[0]
        assert result.returncode == 0, result.stdout + result.stderr
        assert running_at_end, "pgbench ended before the rollback did: the test proved nothing\n" + out
        assert bench.returncode == 0, out
        failed = re.search(r"number of failed transactions: (\d+)", out)
        assert failed is None or failed.group(1) == "0", out
        assert "aborted" not in out, out
        assert "paused, not failed" in result.stdout
        assert re.search(r"PgBouncer: +clients paused for \d+ ms", result.stdout), result.stdout
        # Queries through the pooler now reach the restored database, not the renamed old one.
        assert through(bouncer, rd.name, "SELECT to_regclass('app.new_feature') IS NULL")
        assert not bouncer.paused(rd.name)


def test_a_kill_during_the_pause_is_resumed_by_the_next_run(pg_old, env_for, tmp_path):
    with RealisticDatabase(pg_old) as rd, Bouncer(pg_old, {rd.name: (rd.owner, rd.password)}) as bouncer:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url, PGBOUNCER_ADMIN_URL=bouncer.admin_url)
        assert pf.run_script("create_rollback_point.py", "before", env=env).returncode == 0
        rd.migrate()
        proc, flag = pf.start_paused("quick_rollback.py", "--yes", env=env, step="restore-pooler-paused",
                                     folder=tmp_path)
        assert bouncer.paused(rd.name)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        flag.unlink()
        assert bouncer.paused(rd.name), "a killed run leaves the pause (the next run resumes it)"
        again = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "left paused" in again.stdout + again.stderr
        assert not bouncer.paused(rd.name)
        assert through(bouncer, rd.name, "SELECT to_regclass('app.new_feature') IS NULL")


def test_an_unreachable_pgbouncer_is_refused_before_anything_changes(pg_old, env_for):
    with RealisticDatabase(pg_old) as rd:
        port = free_port()  # nothing listens there
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url,
                      PGBOUNCER_ADMIN_URL=f"postgresql://rbadmin:secret-pw@127.0.0.1:{port}/pgbouncer")
        assert pf.run_script("create_rollback_point.py", "before", env=env).returncode == 0
        rd.migrate()
        migrated = pf.fingerprint(pg_old, rd.name)
        refused = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "PgBouncer is configured" in refused.stderr and "cannot be reached" in refused.stderr
        assert "Confirmed" not in refused.stdout and "secret-pw" not in refused.stdout + refused.stderr
        assert pf.fingerprint(pg_old, rd.name) == migrated


def test_pgbouncer_dying_after_the_swap_is_reported_as_a_restore_that_happened(pg_old, env_for, tmp_path):
    """Review defect 2: RESUME failing after the renames had committed read as 'the swap failed;
    staging is unchanged'."""
    from tests.realistic import database_fingerprint, differences
    with RealisticDatabase(pg_old) as rd, Bouncer(pg_old, {rd.name: (rd.owner, rd.password)}) as bouncer:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url, PGBOUNCER_ADMIN_URL=bouncer.admin_url)
        before = database_fingerprint(pg_old, rd.name)
        assert pf.run_script("create_rollback_point.py", "before", env=env).returncode == 0
        rd.migrate()
        proc, flag = pf.start_paused("quick_rollback.py", "--yes", env=env, step="restore-swapped", folder=tmp_path)
        bouncer.proc.kill()
        bouncer.proc.wait(10)
        flag.unlink()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        assert "swap failed" not in out + err and "is unchanged" not in out + err
        assert f"{rd.name} IS restored, but this did not finish: PgBouncer could not be resumed" in out
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        conn = connect(pg_old.info)
        try:
            kept = scalar(conn, "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                          (rd.name + "\\_\\_pre\\_rollback\\_%",))
        finally:
            conn.close()
        assert kept == 1
