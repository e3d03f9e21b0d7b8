"""One command for the whole release (common/release/records.py): configuration, code and database under one
id, restored in the documents' order Configuration -> Code -> Database, each verified, then the
documents' health metrics. Real files, a real git repository, a realistic database."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests import pgfixtures as pf
from tests.realistic import RealisticDatabase, database_fingerprint, differences
from tests.test_code_rollback import GIT_ENV, commit_all, git

CALM = {"ROLLBACK_MAX_CPU_PERCENT": "100", "ROLLBACK_MAX_MEMORY_PERCENT": "100"}  # a busy CI machine is not a failure


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".git" not in p.parts}


@pytest.fixture
def release_world(pg_old, env_for, tmp_path):
    server = pg_old  # the release logic does not depend on the major; the database restore is tested on both
    with RealisticDatabase(server) as rd:
        repo = tmp_path / "code" / "app"  # its own parent folder, which one test makes unwritable
        repo.mkdir(parents=True)
        git(repo, "init", "-q", "-b", "main")
        (repo / "app.py").write_text("VERSION = 41\n")
        commit_all(repo, "release 41")
        (repo / "notes.txt").write_text("uncommitted at release time\n")
        config = tmp_path / "config"
        (config / "services").mkdir(parents=True)
        (config / "app.yml").write_text("# app\nserver:\n  workers: 4  # finance\n")
        (config / "services" / "pay.json").write_text('{\n    "retries": 3\n}\n')
        env_file = tmp_path / "app.env"
        env_file.write_text("# secrets\nAPI_TOKEN=abc\n")
        env = env_for(server, rd.name, STAGING_DATABASE_URL=rd.url, REPO_PATH=str(repo),
                      CODE_BACKUP_DIR=str(tmp_path / "code_backups"), CONFIG_DIR=str(config),
                      CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"), ENV_FILE=str(env_file), **GIT_ENV, **CALM)
        yield {"rd": rd, "env": env, "repo": repo, "config": config, "env_file": env_file, "server": server}


def state(w) -> dict:
    repo = w["repo"]
    return {"config": tree(w["config"]), "env_file": w["env_file"].read_bytes(),
            "head": git(repo, "rev-parse", "HEAD").strip(), "branch": git(repo, "branch", "--show-current").strip(),
            "worktree": tree(repo), "status": git(repo, "status", "--porcelain")}


def change_everything(w) -> None:
    repo, config = w["repo"], w["config"]
    (config / "app.yml").write_text("server:\n  workers: 16\n")
    (config / "new.yaml").write_text("added: true\n")
    w["env_file"].write_text("API_TOKEN=changed\n")
    (repo / "app.py").write_text("VERSION = 42\n")
    commit_all(repo, "release 42")
    (repo / "app.py").write_text("VERSION = 42.1  # hotfix in progress\n")
    w["rd"].migrate()


def create(env, description="Release 41"):
    made = pf.run_script("rollback_manager.py", "create", "--all", "--description", description, "--json", env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    return json.loads(made.stdout)


def test_the_whole_release_comes_back_in_order_and_exactly(release_world):
    w = release_world
    before, db_before = state(w), database_fingerprint(w["server"], w["rd"].name)
    made = create(w["env"])
    assert set(made["parts"]) == {"config", "code", "database"} and made["status"] == "OK"
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=w["env"]).stdout)
    assert [r["id"] for r in listed["releases"]] == [made["id"]] and listed["releases"][0]["status"] == "OK"
    change_everything(w)
    result = pf.run_script("rollback_manager.py", "restore", "--all", "--latest", "--yes", "--json", env=w["env"])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["release"] == made["id"]
    assert [s["component"] for s in report["steps"]] == ["config", "code", "database"]
    assert all(s["ok"] and s["seconds"] < s["rto_seconds"] for s in report["steps"])
    assert report["health"]["ok"] and {"error_rate", "response_ms", "cpu_percent", "memory_percent"} <= set(report["health"])
    assert state(w) == before
    assert differences(db_before, database_fingerprint(w["server"], w["rd"].name)) == []
    # the summary names what it moved: the backups of configuration and code as they were, and the
    # release-42 commit that left the branch, with the one command that brings it back
    config_step, code_step = report["steps"][0]["detail"], report["steps"][1]["detail"]
    assert "the configuration as it was is in " + str(w["env"]["CONFIG_BACKUP_DIR"]) in config_step, config_step
    assert "the code as it was is in " + str(w["env"]["CODE_BACKUP_DIR"]) in code_step, code_step
    command = code_step.split("`")[1]
    assert "(HEAD before) is on no branch now" in code_step and command.startswith("git -C ")
    subprocess.run(command.split(), check=True, capture_output=True)
    rescued = command.split()[-2]
    assert git(w["repo"], "log", "-1", "--format=%s", rescued).strip() == "release 42"
    # the log shows the order: configuration, then code, then database
    log = next(Path(w["env"]["LOG_DIR"]).glob("rollback_manager_*.log"))
    text = "".join(p.read_text() for p in Path(w["env"]["LOG_DIR"]).glob("rollback_manager_*.log"))
    assert log and text.index("config    OK") < text.index("code      OK") < text.index("database  OK")


def test_a_failing_code_step_stops_before_the_database_and_says_so(release_world):
    w = release_world
    create(w["env"])
    change_everything(w)
    migrated = database_fingerprint(w["server"], w["rd"].name)
    changed_code = state(w)["worktree"]
    parent = w["repo"].parent
    os.chmod(parent, 0o555)  # the code restore swaps the repository folder: it cannot write beside it
    try:
        if os.geteuid() == 0:  # root ignores modes: make the folder immutable instead
            assert os.system(f"chattr +i '{parent}' 2>/dev/null") == 0 or pytest.fail(
                "the test needs chattr (e2fsprogs) on a file system with the immutable flag")
        result = pf.run_script("rollback_manager.py", "restore", "--all", "--latest", "--yes", "--json", env=w["env"])
    finally:
        if os.geteuid() == 0:
            os.system(f"chattr -i '{parent}'")
        os.chmod(parent, 0o755)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = {s["component"]: s for s in json.loads(result.stdout)["steps"]}
    assert steps["config"]["ok"] is True and steps["code"]["ok"] is False and steps["code"]["error"]
    assert "database" not in steps or steps["database"]["ok"] is None
    assert "the code step failed" in result.stderr
    assert differences(migrated, database_fingerprint(w["server"], w["rd"].name)) == []
    assert state(w)["worktree"] == changed_code


def test_a_kill_between_steps_is_reported_by_the_next_list(release_world, tmp_path):
    w = release_world
    before = state(w)
    made = create(w["env"])
    change_everything(w)
    migrated, code_changed = database_fingerprint(w["server"], w["rd"].name), state(w)["worktree"]
    proc, flag = pf.start_paused("rollback_manager.py", "restore", "--all", "--latest", "--yes", env=w["env"],
                                 step="release-config-done", folder=tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    flag.unlink()
    assert state(w)["config"] == before["config"]          # restored
    assert state(w)["worktree"] == code_changed             # as it was
    assert differences(migrated, database_fingerprint(w["server"], w["rd"].name)) == []
    listed = pf.run_script("rollback_manager.py", "list", env=w["env"]).stdout
    assert f"release {made['id']}: a rollback was interrupted: restored config; as they were: code, database" in listed
    again = pf.run_script("rollback_manager.py", "restore", "--all", "--file", made["id"], "--yes", env=w["env"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert state(w) == before and "interrupted" not in pf.run_script("rollback_manager.py", "list", env=w["env"]).stdout


def test_a_second_release_operation_is_refused_while_one_runs_and_changes_nothing(release_world, tmp_path):
    """Each step has its own lock; between steps only the release lock keeps a second release
    rollback (or a release point being made) from mixing one release's configuration with
    another's code."""
    w = release_world
    before, db_before = state(w), database_fingerprint(w["server"], w["rd"].name)
    made = create(w["env"])
    change_everything(w)
    migrated = database_fingerprint(w["server"], w["rd"].name)
    first, flag = pf.start_paused("rollback_manager.py", "restore", "--all", "--latest", "--yes", env=w["env"],
                                  step="release-config-done", folder=tmp_path)
    try:
        during = state(w)  # configuration restored, code and database not yet
        second = pf.run_script("rollback_manager.py", "restore", "--all", "--latest", "--yes", env=w["env"])
        another = pf.run_script("rollback_manager.py", "create", "--all", "--description", "meanwhile", env=w["env"])
        for refused in (second, another):
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert "another release operation" in refused.stderr and "rollback_manager" in refused.stderr
            assert "Nothing was changed" in refused.stderr
        assert state(w) == during
        assert differences(migrated, database_fingerprint(w["server"], w["rd"].name)) == []
    finally:
        flag.unlink()
        out = first.communicate(timeout=180)
    assert first.returncode == 0, out
    assert state(w) == before
    assert differences(db_before, database_fingerprint(w["server"], w["rd"].name)) == []
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=w["env"]).stdout)
    assert [r["id"] for r in listed["releases"]] == [made["id"]]


def test_a_crossed_health_threshold_gives_exit_4(release_world):
    w = release_world
    create(w["env"])
    change_everything(w)
    env = dict(w["env"], ROLLBACK_MAX_RESPONSE_MS="0")  # every probe takes longer than 0 ms
    result = pf.run_script("rollback_manager.py", "restore", "--all", "--latest", "--yes", "--json", env=env)
    assert result.returncode == 4, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert all(s["ok"] for s in report["steps"])
    assert report["health"]["ok"] is False and any("response ms" in p for p in report["health"]["problems"])


def test_a_release_whose_database_part_fails_is_not_recorded(release_world):
    w = release_world
    env = dict(w["env"], STAGING_DATABASE_URL=w["rd"].url.replace(w["rd"].name, "no_such_database"))
    made = pf.run_script("rollback_manager.py", "create", "--all", "--description", "broken", env=env)
    assert made.returncode == 1, made.stdout + made.stderr
    assert "the database part failed" in made.stderr and "no release rollback point was recorded" in made.stderr
    assert "configuration backup" in made.stderr and "code backup" in made.stderr
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=w["env"]).stdout)
    assert listed["releases"] == []


def test_cleanup_removes_a_release_whole_and_never_the_newest(release_world):
    w = release_world
    first = create(w["env"], "Release 41")
    second = create(w["env"], "Release 42")
    cleaned = pf.run_script("rollback_manager.py", "cleanup", "--older-than", "0", "--yes", env=w["env"])
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    listed = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=w["env"]).stdout)
    assert [r["id"] for r in listed["releases"]] == [second["id"]] and listed["releases"][0]["status"] == "OK"
    for part in ("config", "code"):
        assert not Path(first["parts"][part]["path"]).exists() and Path(second["parts"][part]["path"]).exists()
    code_cleanup = pf.run_script("code_rollback.py", "cleanup", "0", "--yes", env=w["env"])
    assert code_cleanup.returncode == 0 and Path(second["parts"]["code"]["path"]).exists()


def test_a_failure_after_the_database_swap_reports_the_step_done_with_a_warning(release_world):
    """Review defect 2: a release whose database had been swapped said 'the failed step itself changed nothing'."""
    w = release_world
    before, db_before = state(w), database_fingerprint(w["server"], w["rd"].name)
    create(w["env"])
    change_everything(w)
    result = pf.run_script("rollback_manager.py", "restore", "--all", "--latest", "--yes", "--json",
                           env=dict(w["env"], ROLLBACK_TEST_FAIL_AT="restore-finishing"))
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {s["component"]: s for s in json.loads(result.stdout)["steps"]}
    assert all(steps[c]["ok"] for c in ("config", "code", "database"))
    assert "WARNING, not finished" in steps["database"]["detail"] and "injected" in steps["database"]["detail"]
    assert "IS restored, but this did not finish" in result.stderr
    assert "changed nothing" not in result.stderr
    assert state(w) == before
    assert differences(db_before, database_fingerprint(w["server"], w["rd"].name)) == []
