"""Code rollback never loses work (common/files/coderepo.py, worktree.py, inplace.py): every state a git user's
repository can be in comes back byte for byte, or the operation refuses with nothing changed."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests import pgfixtures as pf
from tests.test_code_rollback import GIT_ENV, commit_all, git

ALLOW_FILE = ["-c", "protocol.file.allow=always"]


def run(env, *args, cwd=None, **kw):
    return pf.run_script("code_rollback.py", *args, env=env, cwd=cwd, **kw)


def disk(repo: Path) -> dict:
    """Every entry under the repository but its own .git, as a user would compare them: bytes, mode,
    owner, link targets, empty folders, and which files share an inode."""
    out, inodes = {}, {}
    for root, dirs, names in os.walk(repo):
        if Path(root) == repo:
            dirs[:] = [d for d in dirs if d != ".git"]
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = str(path.relative_to(repo))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), st.st_uid)
            else:
                inodes.setdefault(st.st_ino, []).append(rel)
                out[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), st.st_uid,
                            hashlib.sha256(path.read_bytes()).hexdigest())
    out["(hard links)"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return out


def index_state(repo: Path) -> dict:
    return {"stage": git(repo, "ls-files", "-s"), "flags": git(repo, "ls-files", "-v"),
            "ita": git(repo, "diff", "--name-only", "--diff-filter=A"), "head": git(repo, "rev-parse", "HEAD"),
            "branch": git(repo, "symbolic-ref", "HEAD")}


@pytest.fixture
def world(tmp_path):
    """A repository with everything a user may have: see `full_repo`."""
    repo = tmp_path / "app"
    repo.mkdir()
    env = pf.script_env(tmp_path, REPO_PATH=str(repo), CODE_BACKUP_DIR=str(tmp_path / "code_backups"), **GIT_ENV)
    return repo, env, tmp_path


def add_submodule(repo: Path, tmp_path: Path) -> None:
    """A submodule `lib` (from a local repository with one commit)."""
    lib = tmp_path / "libsrc"
    lib.mkdir()
    git(lib, "init", "-q", "-b", "main")
    (lib / "lib.py").write_text("lib = 1\n")
    commit_all(lib, "lib 1")
    git(repo, *ALLOW_FILE, "submodule", "add", "-q", str(lib), "lib")


def full_repo(repo: Path, tmp_path: Path) -> None:
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitattributes").write_text("*.txt text=auto\n*.id ident\n")
    (repo / ".gitignore").write_text("build/\n*.log\n")
    (repo / "app.py").write_text("v = 1\n")
    (repo / "crlf.txt").write_bytes(b"one\ntwo\n")
    (repo / "version.id").write_text("$Id$\n")
    (repo / "settings.ini").write_text("db=committed\n")
    (repo / "sparse.cfg").write_text("skip=committed\n")
    add_submodule(repo, tmp_path)
    commit_all(repo, "release 1")
    # what is on disk and in the index beyond commits:
    (repo / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")  # CRLF in the tree under text=auto
    (repo / "version.id").write_text("$Id$ local\n")  # unexpanded ident
    (repo / "settings.ini").write_text("db=LOCAL-SECRET\n")
    git(repo, "update-index", "--assume-unchanged", "settings.ini")
    (repo / "sparse.cfg").write_text("skip=LOCAL\n")
    git(repo, "update-index", "--skip-worktree", "sparse.cfg")
    (repo / "key.pem").write_text("-----KEY-----\n")
    (repo / "key.pem").chmod(0o600)
    (repo / "tool.sh").write_text("#!/bin/sh\n")
    (repo / "tool.sh").chmod(0o750)
    (repo / "empty" / "nested-empty").mkdir(parents=True)
    (repo / "a.dat").write_bytes(b"shared inode\n")
    os.link(repo / "a.dat", repo / "b.dat")
    (repo / "planned.py").write_text("planned\n")
    git(repo, "add", "-N", "planned.py")  # intent to add
    vendor = repo / "vendor" / "lib"
    vendor.mkdir(parents=True)
    git(vendor, "init", "-q", "-b", "main")
    (vendor / "v.py").write_text("vendored\n")
    commit_all(vendor, "unpushed work in a nested repository")
    (repo / "lib" / "lib.py").write_text("lib = 2  # uncommitted in the submodule\n")
    (repo / "lib" / "scratch.txt").write_text("untracked in the submodule\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_bytes(b"ignored build output\n")


def test_every_kind_of_work_comes_back_byte_for_byte(world):
    repo, env, tmp_path = world
    full_repo(repo, tmp_path)
    before, index_before = disk(repo), index_state(repo)
    nested_log = git(repo / "vendor" / "lib", "log", "--format=%H %s")
    made = run(env, "backup", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    meta = json.loads(made.stdout)
    assert "settings.ini (edited, marked assume-unchanged)" in meta["dirty_files"]
    assert "sparse.cfg (edited, marked skip-worktree)" in meta["dirty_files"]
    # then everything changes: a commit, the nested repository gone, the submodule cleaned, flags cleared
    git(repo, "update-index", "--no-assume-unchanged", "settings.ini")
    git(repo, "update-index", "--no-skip-worktree", "sparse.cfg")
    git(repo, "checkout", "--", "settings.ini", "sparse.cfg")
    (repo / "app.py").write_text("v = 2\n")
    commit_all(repo, "release 2")
    subprocess.run(["rm", "-rf", str(repo / "vendor"), str(repo / "empty"), str(repo / "key.pem")], check=True)
    git(repo / "lib", "checkout", "--", ".")
    git(repo / "lib", "clean", "-fdq")
    (repo / "crlf.txt").write_bytes(b"one\ntwo\n")
    (repo / "build" / "out.bin").write_bytes(b"newer ignored output\n")
    restored = run(env, "restore", meta["path"], "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    after = disk(repo)
    after.pop("build/out.bin")  # ignored, not in the backup: the current one is kept
    expected = dict(before)
    expected.pop("build/out.bin")
    assert after == expected
    assert (repo / "build" / "out.bin").read_bytes() == b"newer ignored output\n"
    assert index_state(repo) == index_before  # flags, intent-to-add and stages as they were
    assert git(repo / "vendor" / "lib", "log", "--format=%H %s") == nested_log
    assert (repo / "lib" / "scratch.txt").read_text() == "untracked in the submodule\n"
    assert git(repo, "fsck", "--no-progress") == ""


def _archived(backup: Path, name: str) -> bytes:
    with tarfile.open(backup / "worktree.tar") as tar:
        return tar.extractfile(name).read()


def _newest_backup(env) -> Path:
    return sorted(Path(env["CODE_BACKUP_DIR"]).glob("code_*"))[-1]


def test_rollback_keeps_what_a_reset_writes_over_and_names_its_own_stash(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "config.local").write_text("password=committed\n")
    (repo / "app.py").write_text("v = 1\n")
    old = commit_all(repo, "release 1 (config.local still tracked)")
    git(repo, "rm", "-q", "--cached", "config.local")
    (repo / ".gitignore").write_text("config.local\n")
    (repo / "config.local").write_text("password=LOCAL\n")
    (repo / "notes.md").write_text("n\n")
    commit_all(repo, "release 2 (config.local ignored)")
    add_submodule(repo, tmp_path)
    commit_all(repo, "release 3")
    git(repo, "config", "submodule.recurse", "true")
    (repo / "app.py").write_text("user's stash\n")
    git(repo, "stash", "push", "-q", "-m", "USER STASH")
    user_stash = git(repo, "rev-parse", "refs/stash")
    (repo / "lib" / "lib.py").write_text("lib = dirty, uncommitted\n")
    (repo / "app.py").write_text("v = local edit\n")
    result = run(env, "rollback", old, "--yes")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "config.local" in out and "ignored file(s) the target commit tracks" in out
    assert (repo / "config.local").read_text() == "password=committed\n"  # the reset wrote it over ...
    assert _archived(_newest_backup(env), "config.local") == b"password=LOCAL\n"  # ... after it was saved
    assert (repo / "lib" / "lib.py").read_text() == "lib = dirty, uncommitted\n"  # not discarded by recursion
    ours = git(repo, "rev-parse", "refs/stash")
    assert ours != user_stash and f"git stash apply {ours[:12]}" in out and "USER STASH" not in out
    assert user_stash in git(repo, "log", "-g", "--format=%H", "refs/stash")  # the user's stash is still there


def backed_up_then_moved_on(repo: Path, env) -> str:
    """A repository with a commit, a backup of it, then a second commit; returns the backup's path."""
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("1\n")
    commit_all(repo, "one")
    backup = json.loads(run(env, "backup", "--json").stdout)["path"]
    (repo / "a.txt").write_text("2\n")
    commit_all(repo, "two")
    return backup


def test_a_commit_during_a_restore_is_refused_and_a_moved_ref_stops_the_swap(world):
    repo, env, tmp_path = world
    backup = backed_up_then_moved_on(repo, env)
    proc, flag = pf.start_paused("code_rollback.py", "restore", backup, "--yes", env=env, step="code-restore-built",
                                 folder=tmp_path)
    (repo / "a.txt").write_text("3\n")
    blocked = subprocess.run(["git", "commit", "-qam", "during the restore"], cwd=repo, capture_output=True, text=True,
                             env={**os.environ, **GIT_ENV})
    assert blocked.returncode != 0 and "index.lock" in blocked.stderr
    moved = git(repo, "rev-parse", "HEAD")
    git(repo, "update-ref", "refs/heads/during", moved)  # a ref that moves without the index
    flag.unlink()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "changed while the restore was being built" in err, out + err
    assert (repo / "a.txt").read_text() == "3\n" and git(repo, "rev-parse", "HEAD") == moved
    assert not (repo / ".git" / "index.lock").exists()


def test_a_failed_restore_leaves_the_live_repository_and_its_reflog_untouched(world):
    repo, env, tmp_path = world
    backup = backed_up_then_moved_on(repo, env)
    reflog = (repo / ".git" / "logs" / "HEAD").read_bytes()
    before = disk(repo)
    failed = run(dict(env, ROLLBACK_TEST_FAIL_AT="code-restore-built"), "restore", backup, "--yes")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert (repo / ".git" / "logs" / "HEAD").read_bytes() == reflog
    assert disk(repo) == before and not (repo / ".git" / "index.lock").exists()


def _two_states(repo: Path, env) -> tuple:
    """A backup of a dirty state (an edit, an untracked 0600 file, a flag), then a commit and other
    edits on top. Returns (backup path, the disk and index as backed up)."""
    for n in range(3):
        (repo / f"f{n}.txt").write_text(f"{n}\n")
    commit_all(repo, "one")
    (repo / "f0.txt").write_text("edited, uncommitted\n")
    (repo / "key.pem").write_text("secret\n")
    (repo / "key.pem").chmod(0o600)
    made = run(env, "backup", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    state = (disk(repo), index_state(repo))
    (repo / "f0.txt").write_text("two\n")
    (repo / "f9.txt").write_text("new in two\n")
    commit_all(repo, "two")
    (repo / "key.pem").unlink()
    (repo / "stray.txt").write_text("untracked, after the backup\n")
    return json.loads(made.stdout)["path"], state


def test_a_sparse_checkout_is_restored_in_place_and_stays_sparse(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "f5.txt").write_text("5\n")
    (repo / ".gitignore").write_text("*.log\n")
    commit_all(repo, "zero")
    git(repo, "sparse-checkout", "set", "--no-cone", "/*", "!f5.txt")
    (repo / "app.log").write_text("ignored, kept\n")
    backup, (disk_then, index_then) = _two_states(repo, env)
    assert "S f5.txt" in index_then["flags"] and not (repo / "f5.txt").exists()
    restored = run(env, "restore", backup, "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "in place, file by file, because it is a sparse checkout" in restored.stdout
    after = disk(repo)
    assert after.pop("app.log") == disk_then.pop("app.log") and after == disk_then
    assert index_state(repo) == index_then  # the skip-worktree bits of the sparse checkout are kept
    assert git(repo, "config", "core.sparseCheckout") == "true" and not (repo / "f5.txt").exists()
    assert not list(tmp_path.glob(".app.rollback-*")) and git(repo, "fsck", "--no-progress") == ""


def test_a_separate_git_dir_and_a_linked_worktree_are_restored_in_place(world):
    repo, env, tmp_path = world
    sep = tmp_path / "sep.git"
    git(repo, "init", "-q", "-b", "main", f"--separate-git-dir={sep}")
    backup, (disk_then, index_then) = _two_states(repo, env)
    dot_git = (repo / ".git").read_text()
    restored = run(env, "restore", backup, "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "its git folder lives elsewhere" in restored.stdout
    assert disk(repo) == disk_then and index_state(repo) == index_then
    assert (repo / ".git").read_text() == dot_git and sep.is_dir()  # the layout is kept
    assert git(repo, "log", "--format=%s", "main") == "one"
    # a linked worktree on its own branch: restored in place, the main worktree untouched
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(wt))
    main_disk = disk(repo)
    wt_env = dict(env, REPO_PATH=str(wt))
    wt_backup, (wt_disk_then, wt_index_then) = _two_states_on(wt, wt_env)
    restored = run(wt_env, "restore", wt_backup, "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert disk(wt) == wt_disk_then and index_state(wt) == wt_index_then
    assert disk(repo) == main_disk and git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    # the main worktree's backup (branch main) into the linked one would move main under the other
    wt_before = disk(wt)
    refused = run(wt_env, "restore", backup, "--yes")
    assert refused.returncode == 2 and "checked out in another worktree (the main worktree)" in refused.stderr
    assert disk(wt) == wt_before and disk(repo) == main_disk


def _two_states_on(wt: Path, env) -> tuple:
    (wt / "w.txt").write_text("worktree 1\n")
    commit_all(wt, "w1")
    (wt / "w.txt").write_text("worktree 1, edited\n")
    made = run(env, "backup", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    state = (disk(wt), index_state(wt))
    (wt / "w.txt").write_text("worktree 2\n")
    commit_all(wt, "w2")
    return json.loads(made.stdout)["path"], state


def test_an_interrupted_in_place_restore_is_named_by_every_command_until_finished(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main", f"--separate-git-dir={tmp_path / 'sep.git'}")
    backup, (disk_then, index_then) = _two_states(repo, env)
    failed = run(dict(env, ROLLBACK_TEST_FAIL_AT="code-restore-swapped"), "restore", backup, "--yes")
    assert failed.returncode != 0
    for args in (("backup",), ("rollback", "HEAD~1", "--yes")):
        refused = run(env, *args)
        assert refused.returncode == 2 and "was interrupted" in refused.stderr, refused.stdout + refused.stderr
        assert f"code_rollback.py restore {backup} --yes" in refused.stderr
    verify = run(env, "verify")
    assert verify.returncode == 4 and "was interrupted" in verify.stdout, verify.stdout + verify.stderr
    finished = run(env, "restore", backup, "--yes")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert disk(repo) == disk_then and index_state(repo) == index_then
    assert run(env, "verify").returncode == 0


def test_a_folder_that_is_not_a_repository_is_refused_with_nothing_changed(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "f.txt").write_text("f\n")
    commit_all(repo, "one")
    backup = json.loads(run(env, "backup", "--json").stdout)["path"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "mine.txt").write_text("not in any backup\n")
    refused = run(dict(env, REPO_PATH=str(plain)), "restore", backup, "--yes")
    assert refused.returncode == 2 and "not a git repository and is not empty" in refused.stderr
    assert (plain / "mine.txt").read_text() == "not in any backup\n"


def test_as_root_another_user_s_repository_is_refused(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("1\n")
    commit_all(repo, "one")
    backup = json.loads(run(env, "backup", "--json").stdout)["path"]
    if os.geteuid() != 0:  # an ordinary user cannot give a folder away: the check is root's
        assert run(env, "restore", backup, "--yes").returncode == 0
        return
    subprocess.run(["chown", "-R", "nobody:nogroup", str(repo)], check=True)
    before = disk(repo)
    refused = run(env, "restore", backup, "--yes")
    assert refused.returncode == 2 and "belongs to nobody" in refused.stderr, refused.stdout + refused.stderr
    assert disk(repo) == before


def test_hooks_and_fsmonitor_never_run(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("1\n")
    commit_all(repo, "one")
    (repo / "a.txt").write_text("2\n")
    commit_all(repo, "two")
    ran = tmp_path / "hook-ran"
    for hook in ("reference-transaction", "post-index-change", "post-checkout", "pre-auto-gc"):
        path = repo / ".git" / "hooks" / hook
        path.write_text(f"#!/bin/sh\necho {hook} >> '{ran}'\n")
        path.chmod(0o755)
    monitor = tmp_path / "fsmonitor.sh"
    monitor.write_text(f"#!/bin/sh\necho fsmonitor >> '{ran}'\n")
    monitor.chmod(0o755)
    git(repo, "config", "core.fsmonitor", str(monitor))
    ran.unlink(missing_ok=True)
    backup = json.loads(run(env, "backup", "--json").stdout)["path"]
    assert run(env, "rollback", "HEAD~1", "--yes").returncode == 0
    assert run(env, "restore", backup, "--yes").returncode == 0
    assert run(env, "verify").returncode == 0
    assert not ran.exists(), ran.read_text()


def test_a_shallow_clone_says_what_its_backup_can_do(world):
    repo, env, tmp_path = world
    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q", "-b", "main")
    for n in range(3):
        (origin / "a.txt").write_text(f"{n}\n")
        commit_all(origin, f"c{n}")
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{origin}", str(repo)], check=True)
    made = run(env, "backup", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    meta = json.loads(made.stdout)
    assert meta["shallow"] is True
    (repo / "a.txt").write_text("local\n")
    assert run(env, "restore", meta["path"], "--yes").returncode == 0
    assert (repo / "a.txt").read_text() == "2\n"
    fresh = tmp_path / "fresh"
    refused = run(dict(env, REPO_PATH=str(fresh)), "restore", meta["path"], "--yes")
    assert refused.returncode == 2 and "shallow clone" in refused.stderr and not fresh.exists()


def test_a_repository_without_commits_comes_back(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "draft.txt").write_text("first draft\n")
    git(repo, "add", "draft.txt")
    made = run(env, "backup", "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    meta = json.loads(made.stdout)
    (repo / "draft.txt").write_text("lost?\n")
    restored = run(env, "restore", meta["path"], "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "(none yet)" in restored.stdout and (repo / "draft.txt").read_text() == "first draft\n"
    assert git(repo, "ls-files") == "draft.txt"


def test_a_shell_inside_the_repository_is_told_to_cd_back(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("1\n")
    commit_all(repo, "one")
    backup = json.loads(run(env, "backup", "--json").stdout)["path"]
    result = run(env, "restore", backup, "--yes", cwd=str(repo))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cd {repo}" in result.stderr


def test_publishing_never_prunes_a_folder_it_did_not_make_or_files_it_did_not_write(world):
    repo, env, tmp_path = world
    deploy = tmp_path / "deploy"
    env = dict(env, DEPLOYMENT_DIR=str(deploy))
    git(repo, "init", "-q", "-b", "main")
    commits = []
    for n in range(8):
        (repo / "a.txt").write_text(f"{n}\n")
        commits.append(commit_all(repo, f"c{n}"))
    assert run(env, "rollback", commits[0], "--yes").returncode == 0
    [first] = list((deploy / "releases").iterdir())
    (first / "uploaded-by-hand.txt").write_text("hand-made\n")
    handmade = deploy / "releases" / "99999999_999999_999_handmade"
    handmade.mkdir()
    (handmade / "x").write_text("x\n")
    said = ""
    for commit in commits[1:7]:
        result = run(env, "rollback", commit, "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        said += result.stderr
    assert (first / "uploaded-by-hand.txt").exists() and (handmade / "x").exists()
    assert "1 file(s) this toolkit did not write (uploaded-by-hand.txt)" in said
    assert f"{handmade} was not made by this toolkit" in said
    assert os.readlink(deploy / "current").endswith(commits[6][:8])


def test_a_restore_over_an_ignored_file_keeps_its_current_content_in_the_automatic_backup(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    (repo / "config.local").write_text("password=at-backup\n")
    (repo / "app.py").write_text("v = 1\n")
    commit_all(repo, "config.local tracked")
    backup = json.loads(run(env, "backup", "--json").stdout)["path"]
    git(repo, "rm", "-q", "--cached", "config.local")
    (repo / ".gitignore").write_text("config.local\n")
    commit_all(repo, "config.local ignored")
    (repo / "config.local").write_text("password=LOCAL-NOW\n")
    restored = run(env, "restore", backup, "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "ignored file(s) the backup has at the same path: replaced" in restored.stdout and "config.local" in restored.stdout
    assert (repo / "config.local").read_text() == "password=at-backup\n"
    automatic = _newest_backup(env)
    assert Path(automatic) != Path(backup)
    assert _archived(automatic, "config.local") == b"password=LOCAL-NOW\n"  # the way back


def test_verify_compares_with_the_backup_last_restored_and_names_every_drift(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main")
    backup, _ = _two_states(repo, env)
    newer = run(env, "backup", "--json")  # newer than the one restored: not the reference after the restore
    assert newer.returncode == 0
    assert run(env, "restore", backup, "--yes").returncode == 0
    report = json.loads(run(env, "verify", "--json").stdout)
    assert report["compared_with"] == backup and report["reference"].startswith("the backup last restored")
    assert report["drift"] == {"head": None, "added": [], "removed": [], "changed": []}, report["drift"]
    (repo / "f1.txt").write_text("edited after the restore\n")
    (repo / "key.pem").chmod(0o644)
    (repo / "new.txt").write_text("new\n")
    (repo / "f2.txt").unlink()
    (repo / "ignored.log").write_text("x\n")
    (repo / ".git" / "info" / "exclude").write_text("*.log\n")
    result = run(env, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    drift = json.loads(run(env, "verify", "--json").stdout)["drift"]
    assert drift == {"head": None, "added": ["new.txt"], "removed": ["f2.txt"], "changed": ["f1.txt", "key.pem"]}
    assert "drift against " + Path(backup).name in result.stdout and "added new.txt" in result.stdout


def test_in_place_never_replaces_a_folder_of_ignored_files_with_a_file(world):
    repo, env, tmp_path = world
    git(repo, "init", "-q", "-b", "main", f"--separate-git-dir={tmp_path / 'sep.git'}")
    (repo / ".gitignore").write_text("*.secret\n")
    (repo / "settings").write_text("a file in the backup\n")
    commit_all(repo, "settings as a file")
    backup = json.loads(run(env, "backup", "--json").stdout)["path"]
    git(repo, "rm", "-q", "settings")
    (repo / "settings").mkdir()
    (repo / "settings" / "local.py").write_text("tracked\n")
    (repo / "settings" / "db.secret").write_text("password, ignored, in no backup\n")
    commit_all(repo, "settings as a folder")
    before = disk(repo)
    refused = run(env, "restore", backup, "--yes")
    assert refused.returncode == 2 and "settings/db.secret" in refused.stderr, refused.stdout + refused.stderr
    assert disk(repo) == before and not (tmp_path / "sep.git" / "rollback-in-place.json").exists()
