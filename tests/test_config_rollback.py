"""config_rollback.py on real files in temporary folders (DESIGN §9)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
from pathlib import Path

import pytest
import yaml

from tests import pgfixtures as pf


def snapshot_tree(config: Path, env_file: Path) -> dict:
    out = {}
    for path in sorted(config.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(config))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                   stat.S_IMODE(path.stat().st_mode))
    if env_file.exists():
        out[".env"] = (hashlib.sha256(env_file.read_bytes()).hexdigest(), stat.S_IMODE(env_file.stat().st_mode))
    return out


@pytest.fixture
def setup(tmp_path):
    config = tmp_path / "config"
    (config / "services" / "payments").mkdir(parents=True)
    (config / "config.yml").write_text("app:\n  name: shop\n  debug: true\ndb:\n  pool: 5\n  password: hunter2\n")
    (config / "services" / "payments" / "gateway.json").write_text('{"url": "https://pay", "retries": 3}\n')
    (config / "services" / "feature_flags.yaml").write_text("flags: [a, b]\n")
    (config / "services" / "hook.sh").write_text("#!/bin/sh\necho hook\n")
    (config / "services" / "hook.sh").chmod(0o750)
    (config / "binary.dat").write_bytes(bytes(range(256)))
    (config / "binary.dat").chmod(0o640)
    env_file = tmp_path / "app.env"
    env_file.write_text("DB_PASSWORD=s3cret\nFEATURE=on\n")
    env_file.chmod(0o600)
    env = pf.script_env(tmp_path, CONFIG_DIR=str(config), CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"),
                        ENV_FILE=str(env_file))
    return config, env_file, env


def run(env, *args):
    return pf.run_script("config_rollback.py", *args, env=env)


def backups(env):
    return sorted(Path(env["CONFIG_BACKUP_DIR"]).glob("config_*"))


def test_round_trip_byte_for_byte_with_modes(setup):
    config, env_file, env = setup
    saved = snapshot_tree(config, env_file)
    result = run(env, "backup", "--json")
    assert result.returncode == 0, result.stderr
    folder = Path(json.loads(result.stdout)["path"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.rglob("*") if p.is_file())

    (config / "config.yml").write_text("broken: [\n")
    (config / "services" / "hook.sh").chmod(0o644)
    (config / "binary.dat").unlink()
    (config / "new_dir").mkdir()
    (config / "new_dir" / "added.json").write_text("{}")
    env_file.write_text("DB_PASSWORD=changed\n")
    assert snapshot_tree(config, env_file) != saved

    restored = run(env, "restore", str(folder), "--yes")
    assert restored.returncode == 0, restored.stderr
    assert snapshot_tree(config, env_file) == saved
    assert not (config / "new_dir").exists()
    assert len(backups(env)) == 2  # the automatic backup holds what the restore replaced
    auto = [b for b in backups(env) if b != folder][0]
    assert (auto / "files" / "config" / "new_dir" / "added.json").exists()


def test_update_then_restore(setup):
    config, env_file, env = setup
    saved = snapshot_tree(config, env_file)
    result = run(env, "update", "config.yml", '{"db": {"pool": 10, "password": "n3w"}, "app": {"debug": null}, '
                 '"tags": ["x", "y"]}', "--yes")
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load((config / "config.yml").read_text())
    assert data == {"app": {"name": "shop"}, "db": {"pool": 10, "password": "n3w"}, "tags": ["x", "y"]}
    out = result.stdout
    assert "db.pool: 5 -> 10" in out and "app.debug: true -> (absent)" in out and "db.password: *** -> ***" in out
    assert "hunter2" not in out and "n3w" not in out
    declined = run(env, "update", "services/payments/gateway.json", '{"retries": 5}')
    assert declined.returncode == 3 and "retries: 3 -> 5" in declined.stdout
    json_update = run(env, "update", "services/payments/gateway.json", '{"retries": 5}', "--yes")
    assert json_update.returncode == 0
    assert json.loads((config / "services/payments/gateway.json").read_text()) == {"url": "https://pay", "retries": 5}
    first = backups(env)[0]  # the automatic backup taken before the first update
    assert run(env, "restore", str(first), "--yes").returncode == 0
    assert snapshot_tree(config, env_file) == saved


@pytest.mark.parametrize("file,patch,says", [
    ("config.yml", '{"key": ', "does not parse"),
    ("config.yml", '["not", "an", "object"]', "must be an object"),
    ("broken.yml", '{"a": 1}', "line 2"),
    ("../../etc/passwd", '{"a": 1}', "outside CONFIG_DIR"),
    ("/etc/passwd", '{"a": 1}', "not absolute"),
    ("escape.yml", '{"a": 1}', "outside CONFIG_DIR"),
    ("missing.yml", '{"a": 1}', "does not exist"),
])
def test_bad_input_is_refused_and_nothing_changes(setup, tmp_path, file, patch, says):
    config, env_file, env = setup
    (config / "broken.yml").write_text("ok: 1\nbad: [unclosed\n")
    outside = tmp_path / "outside.yml"
    outside.write_text("a: 0\n")
    os.symlink(outside, config / "escape.yml")
    before = snapshot_tree(config, env_file)
    result = run(env, "update", file, patch)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert snapshot_tree(config, env_file) == before and outside.read_text() == "a: 0\n"
    assert backups(env) == []


def test_a_backup_that_does_not_match_its_manifest_is_refused(setup):
    config, env_file, env = setup
    assert run(env, "backup").returncode == 0
    [folder] = backups(env)
    (folder / "files" / "config" / "config.yml").write_text("tampered: true\n")
    (config / "config.yml").write_text("current: 1\n")
    before = snapshot_tree(config, env_file)
    result = run(env, "restore", str(folder), "--yes")
    assert result.returncode == 2 and "does not match its manifest" in result.stderr
    assert snapshot_tree(config, env_file) == before and len(backups(env)) == 1


def test_a_kill_during_restore_leaves_whole_files_and_the_next_run_succeeds(setup, tmp_path):
    config, env_file, env = setup
    for n in range(20):
        (config / f"extra_{n:02d}.json").write_text(json.dumps({"n": n, "pad": "x" * 5000}))
    assert run(env, "backup").returncode == 0
    [folder] = backups(env)
    saved = snapshot_tree(config, env_file)
    for n in range(20):
        (config / f"extra_{n:02d}.json").write_text(json.dumps({"n": -n}))
    changed = snapshot_tree(config, env_file)
    proc, _ = pf.start_paused("config_rollback.py", "restore", str(folder), "--yes", env=env,
                              step="config-restore-file-written", folder=tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    now = {k: v for k, v in snapshot_tree(config, env_file).items() if ".tmp-" not in k}
    assert set(now) == set(saved)
    assert all(now[name] in (saved[name], changed[name]) for name in now)  # each file old or new, whole
    assert now != saved and now != changed  # the kill really fell mid-restore
    again = run(env, "restore", str(folder), "--yes")
    assert again.returncode == 0, again.stderr
    assert snapshot_tree(config, env_file) == saved
    assert not list(config.rglob(".*.tmp-*")), "the next run removes the temporary files of the killed one"


def test_verify_reports_parse_errors_with_lines_and_drift(setup):
    config, env_file, env = setup
    ok = run(env, "verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["drift"] is None
    assert run(env, "backup").returncode == 0
    (config / "services" / "feature_flags.yaml").write_text("flags: [a, b\n")
    (config / "new.json").write_text("{\n  \"a\": 1,\n}\n")
    env_file.write_text("GOOD=1\nthis line is not an assignment\n")
    result = run(env, "verify", "--json")
    assert result.returncode == 4
    report = json.loads(result.stdout)
    errors = "\n".join(report["parse_errors"])
    assert "feature_flags.yaml: line 2" in errors and "new.json: line 3" in errors and "app.env: line 2" in errors
    assert report["drift"]["added"] == ["config/new.json"]
    assert "config/services/feature_flags.yaml" in report["drift"]["changed"] and "env/app.env" in report["drift"]["changed"]


def test_cleanup_keeps_the_newest(setup):
    _, _, env = setup
    for _ in range(3):
        assert run(env, "backup").returncode == 0
    for folder in backups(env):
        meta = json.loads((folder / "manifest.json").read_text())
        meta["created_at"] = "2020-01-01T00:00:00+00:00"
        (folder / "manifest.json").write_text(json.dumps(meta))
    assert "Would remove 2" in run(env, "cleanup", "30", "--dry-run").stdout and len(backups(env)) == 3
    assert run(env, "cleanup", "30", "--yes").returncode == 0 and len(backups(env)) == 1


def test_verify_after_a_restore_compares_with_the_backup_restored(setup):
    config, env_file, env = setup
    first = json.loads(run(env, "backup", "--json").stdout)["path"]
    (config / "config.yml").write_text("app:\n  name: shop\n  debug: false\n")
    run(env, "backup")
    restored = run(env, "restore", first, "--yes")
    assert restored.returncode == 0, restored.stderr
    report = json.loads(run(env, "verify", "--json").stdout)
    assert report["compared_with"] == first and "last restored" in report["reference"]
    assert report["drift"] == {"added": [], "removed": [], "changed": []}
