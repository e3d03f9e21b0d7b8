"""code_rollback.py on real git repositories in temporary folders (DESIGN §8)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests import pgfixtures as pf

GIT_ENV = {"GIT_AUTHOR_NAME": "Dev", "GIT_AUTHOR_EMAIL": "dev@example.com",
           "GIT_COMMITTER_NAME": "Dev", "GIT_COMMITTER_EMAIL": "dev@example.com"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def state(repo: Path) -> dict:
    """What a user cares about: HEAD, branch, the index, and every file (bytes, mode, links)."""
    branch = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    tree = {}
    for root, dirs, names in os.walk(repo):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            rel = str(path.relative_to(repo))
            if path.is_symlink():
                tree[rel] = ("link", os.readlink(path))
            else:
                tree[rel] = ("file", oct(path.stat().st_mode & 0o777), hashlib.sha256(path.read_bytes()).hexdigest())
    return {"head": git(repo, "rev-parse", "HEAD"), "branch": branch.strip(),
            "index": git(repo, "ls-files", "-s"), "files": tree}


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "app"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / ".gitignore").write_text("*.pyc\nlocal.env\n")
    (path / "src").mkdir()
    (path / "src" / "app.py").write_text("print('v1')\n")
    (path / "run.sh").write_text("#!/bin/sh\necho run\n")
    (path / "run.sh").chmod(0o755)
    (path / "logo.bin").write_bytes(bytes(range(256)) * 4)
    os.symlink("src/app.py", path / "app-link")
    for n in range(3):
        (path / "CHANGES").write_text(f"release {n}\n")
        commit_all(path, f"release {n}")
    (path / "local.env").write_text("SECRET=kept\n")  # ignored: must survive a restore
    return path


@pytest.fixture
def env(tmp_path, repo):
    return pf.script_env(tmp_path, REPO_PATH=str(repo), CODE_BACKUP_DIR=str(tmp_path / "code_backups"))


def dirty_up(repo: Path) -> None:
    """Staged, unstaged, untracked, deleted, renamed, mode-changed and binary changes."""
    (repo / "src" / "app.py").write_text("print('v2 staged')\n")
    git(repo, "add", "src/app.py")
    (repo / "src" / "app.py").write_text("print('v2 staged then edited')\n")
    (repo / "notes.txt").write_text("untracked\n")
    (repo / "CHANGES").unlink()
    git(repo, "mv", "logo.bin", "logo-renamed.bin")
    (repo / "run.sh").chmod(0o644)
    (repo / "blob.dat").write_bytes(os.urandom(4096))


def run(env, *args, **kw):
    return pf.run_script("code_rollback.py", *args, env=env, **kw)


def backups(env):
    return sorted(Path(env["CODE_BACKUP_DIR"]).glob("code_*"))


def test_backup_then_restore_puts_everything_back(repo, env):
    dirty_up(repo)
    saved = state(repo)
    result = run(env, "backup", "--json")
    assert result.returncode == 0, result.stderr
    meta = json.loads(result.stdout)
    assert meta["dirty"] and meta["branch"] == "main" and meta["commit"] == saved["head"]
    folder = Path(meta["path"])
    assert oct(folder.stat().st_mode & 0o777) == "0o700"

    # the world moves on: new commits, edits, a history rewrite and a gc
    (repo / "new.txt").write_text("new\n")
    commit_all(repo, "after backup")
    git(repo, "commit", "-q", "--amend", "-m", "rewritten")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    (repo / "src" / "app.py").write_text("print('v3')\n")
    assert state(repo) != saved

    restored = run(env, "restore", str(folder), "--yes")
    assert restored.returncode == 0, restored.stderr
    after = state(repo)
    assert after == {**saved, "files": {**saved["files"], "local.env": after["files"]["local.env"]}}
    assert (repo / "local.env").read_text() == "SECRET=kept\n"
    assert len(backups(env)) == 2, "an automatic backup of the state before the restore"
    assert git(repo, "status", "--porcelain") == subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_restore_into_an_empty_folder_recreates_the_repository(repo, env, tmp_path):
    dirty_up(repo)
    git(repo, "tag", "v1.0", "HEAD~1")
    git(repo, "branch", "feature", "HEAD~2")
    saved = state(repo)
    assert run(env, "backup").returncode == 0
    empty = tmp_path / "fresh"
    empty.mkdir()
    result = run(dict(env, REPO_PATH=str(empty)), "restore", str(backups(env)[0]), "--yes")
    assert result.returncode == 0, result.stderr
    got = state(empty)
    saved["files"].pop("local.env")  # ignored files are not part of a backup
    assert got == saved
    assert git(empty, "tag") == "v1.0" and "feature" in git(empty, "branch")


def test_rollback_keeps_the_old_head_and_the_stash(repo, env):
    target = git(repo, "rev-parse", "HEAD~2")
    old_head = git(repo, "rev-parse", "HEAD")
    (repo / "src" / "app.py").write_text("local edit\n")
    (repo / "scratch.txt").write_text("untracked work\n")
    before = json.loads(run(env, "verify", "--json").stdout)
    assert before["head"] == old_head and "src/app.py" in before["dirty_files"]

    result = run(env, "rollback", "HEAD~2", "--yes")
    assert result.returncode == 0, result.stderr
    assert git(repo, "rev-parse", "HEAD") == target and git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    kept = git(repo, "for-each-ref", "--format=%(refname)", "refs/rollback").split()
    assert len(kept) == 1 and git(repo, "rev-parse", kept[0]) == old_head
    stash = git(repo, "rev-parse", "refs/stash")
    assert f"git stash apply {stash[:12]}" in result.stdout and "rollback-toolkit" in git(repo, "stash", "list")
    git(repo, "stash", "show", "--include-untracked", "-p", "stash@{0}")
    after = json.loads(run(env, "verify", "--json").stdout)
    assert after["head"] == target and after["dirty_files"] == [] and after["ok"]
    git(repo, "stash", "pop")
    assert (repo / "scratch.txt").read_text() == "untracked work\n"
    for ref in ("v0", "tags-do-not-exist"):
        assert run(env, "rollback", ref, "--yes").returncode == 2


@pytest.mark.parametrize("trouble", ["unknown", "detached", "merge", "index_lock"])
def test_refusals_change_nothing(repo, env, trouble):
    commit = "HEAD~1"
    if trouble == "unknown":
        commit = "deadbeef"
    elif trouble == "detached":
        git(repo, "checkout", "-q", "--detach", "HEAD")
    elif trouble == "merge":
        (repo / ".git" / "MERGE_HEAD").write_text(git(repo, "rev-parse", "HEAD~1") + "\n")
    else:
        (repo / ".git" / "index.lock").write_text("")
    (repo / "src" / "app.py").write_text("local edit\n")
    before = state(repo)
    result = run(env, "rollback", commit, "--yes")
    assert result.returncode == 2, result.stderr
    assert "Nothing was changed" in result.stderr and "Traceback" not in result.stderr
    assert {"merge": "git merge --abort", "index_lock": "index.lock", "detached": "git checkout"}.get(
        trouble, "not a commit") in result.stderr
    assert state(repo) == before and backups(env) == []


@pytest.mark.parametrize("step", ["code-restore-built", "code-restore-swapped"])
def test_a_kill_during_restore_leaves_old_or_restored_and_the_next_run_succeeds(repo, env, tmp_path, step):
    dirty_up(repo)
    assert run(env, "backup").returncode == 0
    saved = state(repo)
    (repo / "later.txt").write_text("later\n")
    commit_all(repo, "later")
    current = state(repo)
    proc, _ = pf.start_paused("code_rollback.py", "restore", str(backups(env)[0]), "--yes", env=env, step=step,
                              folder=tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    got = state(repo)
    assert got in (current, saved) or got == {**saved, "files": {**saved["files"], "local.env": got["files"]["local.env"]}}
    again = run(env, "restore", str(backups(env)[0]), "--yes")
    assert again.returncode == 0, again.stderr
    assert state(repo)["head"] == saved["head"] and state(repo)["index"] == saved["index"]
    assert not list(repo.parent.glob(".app.rollback-*"))


def test_deployment_releases_and_current(repo, env, tmp_path):
    deploy = tmp_path / "deploy"
    env = dict(env, DEPLOYMENT_DIR=str(deploy))
    heads = []
    for n in range(7):
        (repo / "CHANGES").write_text(f"more {n}\n")
        heads.append(commit_all(repo, f"more {n}"))
    for n in range(6):
        result = run(env, "rollback", heads[-2 - n] if n % 2 == 0 else heads[-1], "--yes")
        assert result.returncode == 0, result.stderr
        current = deploy / "current"
        assert current.is_symlink()
        release = current.resolve()
        assert json.loads((release / ".release.json").read_text())["commit"] == git(repo, "rev-parse", "HEAD")
        assert (release / "CHANGES").read_text() == (repo / "CHANGES").read_text()
        assert os.access(release / "run.sh", os.X_OK)
    releases = [p for p in (deploy / "releases").iterdir() if not p.name.startswith(".")]
    assert len(releases) == 5 and (deploy / "current").resolve() in [r.resolve() for r in releases]
    assert run(env, "verify").returncode == 0
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    mismatch = run(env, "verify")
    assert mismatch.returncode == 4 and "current" in mismatch.stdout


def test_cleanup_keeps_the_newest(repo, env):
    for _ in range(3):
        assert run(env, "backup").returncode == 0
    folders = backups(env)
    for folder in folders:
        meta = json.loads((folder / "metadata.json").read_text())
        meta["created_at"] = "2020-01-01T00:00:00+00:00"
        (folder / "metadata.json").write_text(json.dumps(meta))
    dry = run(env, "cleanup", "30", "--dry-run")
    assert dry.returncode == 0 and "Would remove 2" in dry.stdout and len(backups(env)) == 3
    assert run(env, "cleanup", "30", "--yes").returncode == 0
    assert len(backups(env)) == 1


def test_a_second_operation_on_the_repository_is_refused_naming_the_first(repo, env, tmp_path):
    assert run(env, "backup").returncode == 0
    first, _ = pf.start_paused("code_rollback.py", "restore", str(backups(env)[0]), "--yes", env=env,
                               step="code-restore-built", folder=tmp_path)
    before = state(repo)
    second = run(env, "rollback", "HEAD~1", "--yes")
    first.kill()
    first.communicate()
    assert second.returncode == 1 and " pid=" in second.stderr and "Nothing was changed" in second.stderr
    assert state(repo) == before
