"""Trust nothing on disk (common/trust.py, DESIGN §3): crafted sidecars, manifests, release documents,
links and folders never make the toolkit destroy or run anything. Run as root (as CI does), the
attacker is `nobody`, an ordinary local user; as an ordinary user, a folder others may write."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from common import storage, trust
from common.pg.connections import marker_path
from common.points import catalog
from tests import pgfixtures as pf
from tests.realistic import RealisticDatabase, database_fingerprint, differences

ATTACKER = "nobody"


def as_attacker(path: Path) -> None:
    """Make a folder another user's, as root; else one that others may write."""
    if os.geteuid() == 0:
        entry = pwd.getpwnam(ATTACKER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    else:
        os.chmod(path, 0o777)


def listed(env) -> dict:
    result = pf.run_script("rollback_manager.py", "list", "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return {p["id"]: p for p in json.loads(result.stdout)["points"]}


def plant(folder: Path, point_id: str, **fields) -> Path:
    """A sidecar as a crafted one would be: the toolkit's layout, hostile values."""
    data = {"format_version": 1, "id": point_id, "kind": "dump", "database": "staging",
            "created_at": "2020-01-01T00:00:00+00:00", "file": f"{point_id}.dump", "size_bytes": 1,
            "sha256": "0" * 64, "tables": {}, "duration_seconds": 0.0}
    data.update(fields)
    path = folder / f"{point_id}.json"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


@pytest.fixture
def victim_db(pg_old):
    name = pf.create_database(pg_old, pf.unique_name("victim"), "CREATE TABLE precious (id int); INSERT INTO precious VALUES (1)")
    yield name
    pf.drop_database(pg_old, name)


def test_a_backup_dir_another_user_could_write_is_refused_as_a_whole(pg_old, rich_old, env_for, tmp_path):
    env = env_for(pg_old, rich_old)
    folder = Path(env["BACKUP_DIR"])
    folder.mkdir(mode=0o700)
    as_attacker(folder)
    for command in (("rollback_manager.py", "list"), ("create_rollback_point.py", "refused"),
                    ("quick_rollback.py", "--yes")):
        result = pf.run_script(*command, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        line = result.stderr.strip().splitlines()[0]
        assert f"BACKUP_DIR {folder}" in line and "Nothing was changed" in line, line
        assert (ATTACKER if os.geteuid() == 0 else "0777") in line
        assert "Traceback" not in result.stderr
    assert list(folder.iterdir()) == []  # nothing was written into it
    # the configuration check names it too, beside everything else it checks
    check = subprocess.run([str(pf.ROOT / "setup_and_run.sh"), "2"], env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    assert check.returncode == 4 and f"BACKUP_DIR {folder}" in check.stdout + check.stderr


def test_a_linked_tmp_folder_is_refused_and_its_target_untouched(pg_old, rich_old, env_for, tmp_path):
    v2 = pf.create_database(pg_old, pf.unique_name("v2"), pf.RICH_SCHEMA)
    try:
        env = env_for(pg_old, rich_old, V2_DATABASE_URL=pf.url(pg_old, v2))
        folder = Path(env["BACKUP_DIR"])
        folder.mkdir(mode=0o700)
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o755)
        (folder / ".tmp").symlink_to(target)
        before = pf.fingerprint(pg_old, rich_old)
        result = pf.run_script("reset_staging.py", "--yes", env=env)
        out = result.stdout + result.stderr
        assert result.returncode in (1, 2), out
        assert "is a symbolic link" in out and "Traceback" not in out
        assert stat.S_IMODE(target.stat().st_mode) == 0o755 and list(target.iterdir()) == []
        assert pf.fingerprint(pg_old, rich_old) == before
    finally:
        pf.drop_database(pg_old, v2)


def test_crafted_sidecars_are_invalid_and_never_acted_on(pg_old, victim_db, env_for, tmp_path):
    """Review cases 1-3 and 8: a sidecar naming another database, a file outside the folder, V2 as a
    snapshot, a release part outside its folder, wrong types, a dangling link and a huge sidecar."""
    with RealisticDatabase(pg_old) as rd:
        v2_watcher = pf.connect(pg_old.info, victim_db)  # V2's client: must not be cut
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=rd.url, V2_DATABASE_URL=pf.url(pg_old, victim_db),
                      CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"), CODE_BACKUP_DIR=str(tmp_path / "code_backups"))
        before = database_fingerprint(pg_old, rd.name)
        good = pf.run_script("create_rollback_point.py", "good", env=env)
        assert good.returncode == 0, good.stdout + good.stderr
        folder = Path(env["BACKUP_DIR"])
        victim_file = tmp_path / "victim.txt"
        victim_file.write_text("root's file\n")
        victim_dir = tmp_path / "victim_dir"
        victim_dir.mkdir()
        (victim_dir / "keep").write_text("x")
        plant(folder, f"{rd.name}_20200101_000000_warm", database=rd.name, warm_database=victim_db, warm_oid=1,
              warm_xmin="1")
        plant(folder, f"{rd.name}_20200101_000001_abs", database=rd.name, file=str(victim_file))
        plant(folder, f"{rd.name}_20200101_000002_v2", database=rd.name, kind="snapshot", file=None, sha256=None,
              snapshot_database=victim_db, created_at="2099-01-01T00:00:00+00:00")
        plant(folder, f"{rd.name}_20200101_000003_types", database=rd.name, created_at=5)
        plant(folder, f"{rd.name}_20200101_000004_lookalike", database=rd.name, kind="snapshot", file=None,
              sha256=None, snapshot_database=f"{rd.name}_snap_20200101_000000_000",
              created_at="2099-01-01T00:00:00+00:00")
        pf.create_database(pg_old, f"{rd.name}_snap_20200101_000000_000")  # named like ours, made by nobody here
        (folder / f"{rd.name}_20200101_000005_x.dump.partial").symlink_to(tmp_path / "nowhere")
        huge = plant(folder, f"{rd.name}_20200101_000006_huge", database=rd.name)
        huge.write_text(json.dumps({"pad": "x" * (17 * 1024 * 1024)}))
        releases = folder / "releases"
        releases.mkdir(mode=0o700)
        (releases / "release_20200101_000000_evil.json").write_text(json.dumps({
            "id": "release_20200101_000000_evil", "description": "", "created_at": "2020-01-01T00:00:00+00:00",
            "format_version": 1, "parts": {"config": {"path": str(victim_dir), "sha256": "0" * 64},
                                           "code": {"path": str(victim_dir), "sha256": "0" * 64},
                                           "database": {"id": f"{rd.name}_20200101_000001_abs"}}}))

        started = time.monotonic()
        points = listed(env)
        assert time.monotonic() - started < 30
        statuses = {pid.split("_20200101_")[-1] if "_20200101_" in pid else "good": p["status"]
                    for pid, p in points.items()}
        assert statuses["good"] == "OK"
        for name in ("000000_warm", "000001_abs", "000002_v2", "000003_types", "000006_huge"):
            assert statuses[name] == "INVALID", (name, points)
        assert statuses["000005_x"] == "INVALID"  # the dangling link: listed, no traceback
        lookalike = next(p for pid, p in points.items() if pid.endswith("000004_lookalike"))
        assert lookalike["status"] == "OK"  # a well-formed sidecar, whose database is checked when used
        table = pf.run_script("rollback_manager.py", "list", env=env)
        assert "INVALID" in table.stdout and "Traceback" not in table.stderr

        # A routine point prunes older warm copies: the victim named by the planted sidecar survives.
        again = pf.run_script("create_rollback_point.py", "routine", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert pf.database_exists(pg_old, victim_db)
        # quick_rollback never takes the planted snapshot (INVALID), and the lookalike is refused
        rd.migrate()
        quick = pf.run_script("quick_rollback.py", "--yes", env=env)
        out = quick.stdout + quick.stderr
        assert quick.returncode == 1 and "does not carry the mark" in out, out
        assert pf.rows(v2_watcher, "SELECT count(*) FROM precious") == [(1,)]
        pf.drop_database(pg_old, f"{rd.name}_snap_20200101_000000_000")
        (folder / f"{next(p for p in points if p.endswith('000004_lookalike'))}.json").unlink()
        quick = pf.run_script("quick_rollback.py", "--yes", env=env)
        assert quick.returncode == 0, quick.stdout + quick.stderr
        # cleanup names what it destroys, and destroys nothing outside the toolkit's own
        cleaned = pf.run_script("rollback_manager.py", "cleanup", "--older-than", "30", "--yes", env=env)
        assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
        assert victim_file.read_text() == "root's file\n" and (victim_dir / "keep").exists()
        assert pf.database_exists(pg_old, victim_db)
        assert pf.rows(v2_watcher, "SELECT count(*) FROM precious") == [(1,)]
        v2_watcher.close()
        assert differences(database_fingerprint(pg_old, rd.name), before) == []


def test_a_sidecar_another_user_wrote_is_invalid(tmp_path):
    folder = tmp_path / "backups"
    folder.mkdir(mode=0o700)
    dump = folder / "staging_20260101_000000_x.dump"
    dump.write_bytes(b"PGDMP")
    sidecar = plant(folder, dump.stem, size_bytes=5, sha256=hashlib.sha256(b"PGDMP").hexdigest())
    assert [p.status for p in catalog.scan(folder)] == ["OK"]
    if os.geteuid() == 0:
        entry = pwd.getpwnam(ATTACKER)
        os.chown(sidecar, entry.pw_uid, entry.pw_gid)
    else:
        sidecar.chmod(0o666)
    [point] = catalog.scan(folder)
    assert point.status == "INVALID" and ("must belong to" in point.problem or "may write" in point.problem)


def test_files_are_written_through_no_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    folder = trust.ensure_folder(tmp_path / "backups")
    target = folder / "point.json"
    (folder / "point.json.partial").symlink_to(victim)
    storage.write_json_atomic(target, {"a": 1})
    assert victim.read_text() == "keep me\n" and json.loads(target.read_text()) == {"a": 1}
    assert not (folder / "point.json.partial").exists()


def test_a_restore_does_not_follow_a_planted_marker_link(pg_old, rich_old, env_for, tmp_path):
    env = env_for(pg_old, rich_old)
    before = pf.fingerprint(pg_old, rich_old)
    made = pf.run_script("create_rollback_point.py", "before", env=env)
    assert made.returncode == 0, made.stderr
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    marker = marker_path(Path(env["BACKUP_DIR"]), rich_old)
    marker.with_name(marker.name + ".partial").symlink_to(victim)
    pf.execute(pg_old, rich_old, "DELETE FROM sales.orders WHERE id > 10")
    result = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert victim.read_text() == "keep me\n"
    assert pf.fingerprint(pg_old, rich_old) == before


def test_a_pg_bin_dir_others_may_write_never_runs_its_tools(pg_old, rich_old, env_for, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ran = tmp_path / "planted-ran"
    for tool in ("pg_dump", "pg_restore", "psql"):
        script = bindir / tool
        script.write_text(f"#!/bin/sh\necho \"$PGPASSWORD\" > '{ran}'\nexec '{pg_old.bindir}/{tool}' \"$@\"\n")
        script.chmod(0o755)
    os.chmod(bindir, 0o777)
    env = env_for(pg_old, rich_old, PG_BIN_DIR=str(bindir))
    result = pf.run_script("create_rollback_point.py", "planted", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"PG_BIN_DIR {bindir}" in result.stderr and "0777" in result.stderr
    # the folder made safe, one tool in it others may replace
    os.chmod(bindir, 0o755)
    os.chmod(bindir / "pg_dump", 0o777)
    result = pf.run_script("create_rollback_point.py", "planted", env=env)
    assert result.returncode == 2 and "PG_BIN_DIR's pg_dump" in result.stderr, result.stdout + result.stderr
    assert not ran.exists()


def test_logs_and_every_folder_made_are_owner_only(pg_old, rich_old, env_for, tmp_path):
    env = env_for(pg_old, rich_old, LOG_DIR=str(tmp_path / "new" / "logs"))
    result = pf.run_script("create_rollback_point.py", "modes", env=env)
    assert result.returncode == 0, result.stderr
    for folder in (tmp_path / "new" / "logs", tmp_path / "new", Path(env["BACKUP_DIR"])):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "new" / "logs").iterdir())


@pytest.fixture
def config_world(tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "app.yml").write_text("a: 1\n")
    (config / "tool").write_text("#!/bin/sh\n")
    (config / "tool").chmod(0o755)
    env_file = tmp_path / "app.env"
    env_file.write_text("API_URL=x\n")
    env = pf.script_env(tmp_path, CONFIG_DIR=str(config), CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"),
                        ENV_FILE=str(env_file))
    return config, env_file, env


def test_a_crafted_config_backup_makes_no_setuid_file_and_keeps_the_env_file(config_world):
    config, env_file, env = config_world
    made = pf.run_script("config_rollback.py", "backup", "--json", env=env)
    assert made.returncode == 0, made.stderr
    backup = Path(json.loads(made.stdout)["path"])
    manifest = json.loads((backup / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "tool":
            entry["mode"] = 0o4755
    manifest["files"] = [e for e in manifest["files"] if e["area"] != "env"]
    shutil.rmtree(backup / "files" / "env")
    (backup / "manifest.json").write_text(json.dumps(manifest))
    (config / "tool").write_text("#!/bin/sh\necho changed\n")
    result = pf.run_script("config_rollback.py", "restore", str(backup), "--yes", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    mode = stat.S_IMODE((config / "tool").stat().st_mode)
    assert mode == 0o755 and not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert (config / "tool").stat().st_uid == os.geteuid()
    assert env_file.read_text() == "API_URL=x\n"  # the backup holds no env file: it stays


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/passwd-copy", "a/../../b"])
def test_a_manifest_path_that_leaves_its_folder_is_refused(config_world, tmp_path, path):
    config, env_file, env = config_world
    made = pf.run_script("config_rollback.py", "backup", "--json", env=env)
    backup = Path(json.loads(made.stdout)["path"])
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"][0]["path"] = path
    (backup / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in config.rglob("*") if p.is_file()}
    result = pf.run_script("config_rollback.py", "restore", str(backup), "--yes", env=env)
    assert result.returncode == 2 and "leaves its folder" in result.stderr, result.stdout + result.stderr
    assert {p: p.read_bytes() for p in config.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize("value", ["y\nDB_PASSWORD=evil", "tab\there", "cr\r"])
def test_an_env_value_with_a_control_character_is_refused(config_world, value):
    config, env_file, env = config_world
    result = pf.run_script("config_rollback.py", "update", "app.env", json.dumps({"API_URL": value}), "--yes", env=env)
    assert result.returncode == 2 and "control character" in result.stderr, result.stdout + result.stderr
    assert env_file.read_text() == "API_URL=x\n"
