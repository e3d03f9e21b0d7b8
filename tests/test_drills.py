"""Rehearsed, announced, services handled (issue 33): drills into scratch databases and folders, the stop
and start commands around a rollback, and notices POSTed to a real HTTP receiver started here."""
from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

from common.pg.database import ConnInfo
from tests import pgfixtures as pf
from tests.realistic import RealisticDatabase, database_fingerprint, differences
from tests.test_release import change_everything, create, release_world, state  # noqa: F401 (a fixture)


def points(env):
    listed = pf.run_script("rollback_manager.py", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)["points"]


def make_point(env, *more):
    made = pf.run_script("create_rollback_point.py", "before release", *more, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    return points(env)[0]


def scratch_left(server, staging):
    return [n for n in pf.database_names(server) if n.startswith(f"{staging}__drill_")]


class Receiver:
    """A real HTTP server on loopback that keeps every JSON document POSTed to it."""

    def __init__(self):
        self.received = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN-SECRET"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_drill_restores_beside_staging_while_a_client_works_and_leaves_nothing(server, env_for):
    with RealisticDatabase(server) as rd:
        env = env_for(server, rd.name, STAGING_DATABASE_URL=rd.url)
        point = make_point(env, "--no-warm")
        rd.migrate()
        migrated = database_fingerprint(server, rd.name)
        client = pf.connect(server.info, rd.name)
        try:
            done = pf.run_script("rollback_manager.py", "drill", "--json", env=env)
            assert done.returncode == 0, done.stdout + done.stderr
            [record] = json.loads(done.stdout)["drills"]
            assert record["ok"] and record["point"] == point["id"] and record["objective_seconds"] == 1800
            assert "content and schema identical" in record["checked"] and "pg_restore" in record["tools"]
            assert pf.rows(client, "SELECT 1") == [(1,)]  # the client was not cut
        finally:
            client.close()
        assert differences(migrated, database_fingerprint(server, rd.name)) == []  # staging untouched
        assert scratch_left(server, rd.name) == []
        [listed] = points(env)
        assert listed["last_drill"]["ok"] and not listed["drill_failed"]
        table = pf.run_script("rollback_manager.py", "list", env=env).stdout
        assert f"drilled {listed['last_drill']['at'][:10]} OK in" in table
        info = pf.run_script("rollback_manager.py", "info", "--file", point["id"], env=env).stdout
        assert "last drill:     drilled" in info


def test_a_damaged_dump_fails_its_drill_is_marked_and_quick_rollback_warns(pg_old, env_for):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        point = make_point(env, "--no-warm")
        dump = Path(point["path"])
        data = bytearray(dump.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum, or pg_restore, can tell
        dump.write_bytes(bytes(data))
        with Receiver() as hook:
            done = pf.run_script("rollback_manager.py", "drill", "--every", env=dict(env, ROLLBACK_NOTIFY_URL=hook.url))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "FAILED" in done.stdout + done.stderr and "sha256" in done.stdout + done.stderr
        assert [(n["operation"], n["phase"]) for n in hook.received] == [("drill", "failed")]
        assert hook.received[0]["point"] == point["id"] and "sha256" in hook.received[0]["error"]
        assert scratch_left(pg_old, rd.name) == []
        [listed] = points(env)
        assert listed["drill_failed"] and listed["last_drill"]["ok"] is False
        assert "LAST DRILL FAILED" in pf.run_script("rollback_manager.py", "list", env=env).stdout
        asked = pf.run_script("quick_rollback.py", env=env)  # no terminal: it shows the plan and changes nothing
        assert asked.returncode == 3, asked.stdout + asked.stderr
        assert "WARNING:        its last drill FAILED" in asked.stdout + asked.stderr


def test_a_release_drill_restores_every_part_into_scratch_and_touches_nothing(release_world):  # noqa: F811
    w = release_world
    made = create(w["env"])
    change_everything(w)
    after_change, db_changed = state(w), database_fingerprint(w["server"], w["rd"].name)
    done = pf.run_script("rollback_manager.py", "drill", "--all", "--latest", "--json", env=w["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["release"] == made["id"] and report["ok"]
    assert [(s["component"], s["ok"]) for s in report["steps"]] == [("config", True), ("code", True),
                                                                     ("database", True)]
    assert all(s["seconds"] <= s["rto_seconds"] for s in report["steps"])
    assert state(w) == after_change  # configuration and code as they were: the drill used scratch folders
    assert differences(db_changed, database_fingerprint(w["server"], w["rd"].name)) == []
    assert not list(Path(w["env"]["BACKUP_DIR"]).glob(".drill-*"))
    assert scratch_left(w["server"], w["rd"].name) == []


def test_services_stop_first_and_start_last_also_after_a_failed_step(pg_old, env_for, tmp_path):
    with RealisticDatabase(pg_old) as rd:
        calls = tmp_path / "calls.txt"
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url,
                      ROLLBACK_STOP_COMMAND=f"echo stop >> {calls}; echo stopping the app",
                      ROLLBACK_START_COMMAND=f"echo start >> {calls}")
        before = database_fingerprint(pg_old, rd.name)
        make_point(env, "--no-warm")
        rd.migrate()
        migrated = database_fingerprint(pg_old, rd.name)
        failed = pf.run_script("quick_rollback.py", "--yes", env=dict(env, ROLLBACK_TEST_FAIL_AT="restore-filled"))
        assert failed.returncode != 0
        assert calls.read_text().split() == ["stop", "start"]
        assert differences(migrated, database_fingerprint(pg_old, rd.name)) == []
        assert f"on {rd.name} as it was before: the restore failed" in failed.stdout + failed.stderr
        calls.unlink()
        done = pf.run_script("quick_rollback.py", "--yes", "--json", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert calls.read_text().split() == ["stop", "start"]
        steps = json.loads(done.stdout)["services"]
        assert [(s["step"], s["ok"]) for s in steps] == [("services stop", True), ("services start", True)]
        assert "restored from" in steps[1]["detail"]
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        logs = "".join(p.read_text() for p in Path(env["LOG_DIR"]).glob("*.log"))
        assert "stopping the app" in logs  # the command's output goes to the log
        rd.migrate()
        migrated = database_fingerprint(pg_old, rd.name)
        calls.unlink()
        refused = pf.run_script("quick_rollback.py", "--yes", env=dict(env, ROLLBACK_STOP_COMMAND="exit 7"))
        assert refused.returncode == 1 and "Nothing was changed" in refused.stderr
        assert differences(migrated, database_fingerprint(pg_old, rd.name)) == []
        skipped = pf.run_script("quick_rollback.py", "--yes", "--no-services", env=env)
        assert skipped.returncode == 0 and calls.read_text().split() == ["start"]  # only the one after the refusal


def test_notices_reach_a_receiver_at_start_and_end_with_no_secret_and_an_unreachable_one_changes_nothing(
        pg_old, env_for):
    with RealisticDatabase(pg_old) as rd:
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url)
        before = database_fingerprint(pg_old, rd.name)
        point = make_point(env, "--no-warm")
        rd.migrate()
        with Receiver() as hook:
            noticed = dict(env, ROLLBACK_NOTIFY_URL=hook.url)
            failed = pf.run_script("quick_rollback.py", "--yes", env=dict(noticed, ROLLBACK_TEST_FAIL_AT="restore-filled"))
            assert failed.returncode != 0
            done = pf.run_script("quick_rollback.py", "--yes", env=noticed)
            assert done.returncode == 0, done.stdout + done.stderr
        phases = [(n["operation"], n["phase"], n.get("result")) for n in hook.received]
        assert phases == [("restore", "start", None), ("restore", "end", "failed"), ("restore", "start", None),
                          ("restore", "end", "done")]
        assert "injected" in hook.received[1]["error"] and hook.received[3]["point"] == point["id"]
        assert all(n["text"].startswith("[rollback-toolkit] restore") for n in hook.received)
        assert hook.received[3]["seconds"] >= 0 and rd.name in hook.received[3]["target"]
        password = ConnInfo.parse(rd.url).password
        for notice in hook.received:
            assert password not in json.dumps(notice) and "T0KEN-SECRET" not in json.dumps(notice)
        assert "T0KEN-SECRET" not in done.stdout + done.stderr
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
        # Nobody listens on this port: the notice fails fast, and the rollback does not.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rd.migrate()
        unreached = pf.run_script("quick_rollback.py", "--yes",
                                  env=dict(env, ROLLBACK_NOTIFY_URL=f"http://127.0.0.1:{port}/hook"))
        assert unreached.returncode == 0, unreached.stdout + unreached.stderr
        assert "notice was NOT delivered" in unreached.stdout + unreached.stderr
        assert differences(before, database_fingerprint(pg_old, rd.name)) == []
