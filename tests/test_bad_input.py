"""Bad input gives one clear line, the right exit code (DESIGN §3), no traceback, nothing changed.

The table of cases: (script and arguments, what is set up, expected exit code, words the message
must contain)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import pgfixtures as pf
from tests.test_restore import MIGRATION, drop_all, make_point

CASES = [
    # nonexistent paths, folders, empty files, files that are not dumps
    (["rollback_manager.py", "info", "--file", "/nonexistent/x.dump"], None, 2, "no rollback point"),
    (["rollback_manager.py", "restore", "--file", "{folder}", "--yes"], None, 2, "no rollback point"),
    (["database_rollback.py", "restore", "{empty}", "--yes"], None, 2, "no sidecar"),
    (["database_rollback.py", "restore", "{text}", "--yes"], None, 2, "no sidecar"),
    (["database_rollback.py", "restore", "{fake}", "--yes"], None, 1, "The target was not touched"),
    (["rollback_manager.py", "verify", "--file", "{fake}"], None, 4, "CORRUPT"),
    (["code_rollback.py", "restore", "/nonexistent", "--yes"], None, 2, "not a code backup"),
    (["config_rollback.py", "restore", "{folder}", "--yes"], None, 2, "not a configuration backup"),
    (["simple_rollback.py", "restore", "no_such_snapshot", "--yes"], None, 2, "no snapshot"),
    # numbers and subcommands
    (["rollback_manager.py", "cleanup", "--keep", "-1", "--yes"], None, 2, "--keep at least 1"),
    (["rollback_manager.py", "cleanup", "--older-than", "-5", "--yes"], None, 2, "DAYS must be 0 or more"),
    (["database_rollback.py", "cleanup", "abc"], None, 2, "invalid float value"),
    (["database_rollback.py", "cleanup", "-3", "--yes"], None, 2, "DAYS must be 0 or more"),
    (["code_rollback.py", "cleanup", "-1"], None, 2, "DAYS must be 0 or more"),
    (["rollback_manager.py", "frobnicate"], None, 2, "invalid choice"),
    (["create_rollback_point.py", "x", "--method", "bogus"], None, 2, "invalid choice"),
    (["rollback_manager.py", "restore", "--pick", "99", "--yes"], None, 2, "no rollback point number 99"),
    # connections
    (["create_rollback_point.py", "x"], {"STAGING_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432"}, 2,
     "names no database"),
    (["create_rollback_point.py", "x"], {"STAGING_DATABASE_URL": "mysql://u:p@h/db"}, 2, "must start with postgresql://"),
    (["create_rollback_point.py", "x"], {"STAGING_DATABASE_URL": "postgresql://u:secret-pw@127.0.0.1:{closed}/s"}, 1,
     "cannot connect"),
    (["quick_rollback.py", "--yes"], {"STAGING_DATABASE_URL": "{wrong_password}"}, 1, "password authentication failed"),
    (["database_rollback.py", "verify"], {"DB_NAME": "x", "DB_PORT": "abc"}, 2, "DB_PORT must be a number"),
]


@pytest.fixture
def world(pg_old, env_for, tmp_path):
    staging = pf.create_database(pg_old, pf.unique_name("staging"), pf.RICH_SCHEMA)
    (tmp_path / "repo").mkdir()
    (tmp_path / "config").mkdir()
    env = env_for(pg_old, staging, REPO_PATH=str(tmp_path / "repo"), CONFIG_DIR=str(tmp_path / "config"))
    meta, sidecar = make_point(env)
    pf.execute(pg_old, staging, MIGRATION)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (tmp_path / "empty.dump").write_bytes(b"")
    (tmp_path / "notes.dump").write_text("not a dump\n")
    fake = Path(env["BACKUP_DIR"]) / "staging_fake.dump"  # a text file with a sidecar that matches it
    fake.write_text("this is not a pg_dump archive\n")
    fake_meta = dict(meta, id="staging_fake", file=fake.name, size_bytes=fake.stat().st_size,
                     sha256=__import__("hashlib").sha256(fake.read_bytes()).hexdigest())
    fake.with_suffix(".json").write_text(json.dumps(fake_meta))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    values = {"folder": str(folder), "empty": str(tmp_path / "empty.dump"), "text": str(tmp_path / "notes.dump"),
              "fake": str(fake), "closed": str(closed),
              "wrong_password": pf.url(pg_old, staging).replace(pg_old.info.password, "wrong-pw")}
    yield pg_old, staging, env, values
    drop_all(pg_old, staging)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("argv,overrides,code,words", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input(world, argv, overrides, code, words):
    server, staging, env, values = world
    before = pf.fingerprint(server, staging)
    points_before = sorted(p.name for p in Path(env["BACKUP_DIR"]).iterdir())
    env = dict(env, **{k: v.format(**values) for k, v in (overrides or {}).items()})
    result = pf.run_script(*[a.format(**values) for a in argv], env=env, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert words in output, output
    assert "Traceback" not in output and "secret-pw" not in output and "wrong-pw" not in output
    assert pf.fingerprint(server, staging) == before
    assert sorted(p.name for p in Path(env["BACKUP_DIR"]).iterdir()) == points_before


def test_database_names_with_quotes_and_unicode(pg_old, env_for):
    name = 'Zoë "prod" 数据'
    pf.create_database(pg_old, name, pf.RICH_SCHEMA)
    try:
        env = env_for(pg_old, name)
        before = pf.fingerprint(pg_old, name)
        assert pf.run_script("create_rollback_point.py", "unicode", env=env).returncode == 0
        pf.execute(pg_old, name, MIGRATION)
        result = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert pf.fingerprint(pg_old, name) == before
        listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
        assert listed[0]["database"] == name and listed[0]["status"] == "OK"
    finally:
        drop_all(pg_old, name)
