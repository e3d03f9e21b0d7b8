"""Code rollback with GitPython (DESIGN §8): backups as git bundles plus the exact index and
working tree, restores that swap the whole folder at once, rollbacks that lose nothing."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import git

from . import files, testhooks
from .catalog import stamp, utc_now
from .errors import RollbackError, UsageError
from .log import get_logger

PREFIX, METADATA, BUNDLE = "code", "metadata.json", "repo.bundle"
KEEP_RELEASES = 5
_TMP_REFS = "refs/rollback-backup"
_IDENTITY = {"GIT_AUTHOR_NAME": "rollback-toolkit", "GIT_AUTHOR_EMAIL": "rollback-toolkit@localhost",
             "GIT_COMMITTER_NAME": "rollback-toolkit", "GIT_COMMITTER_EMAIL": "rollback-toolkit@localhost"}


class GitFailed(RollbackError):
    pass


@dataclass
class RepoState:
    commit: Optional[str]
    branch: Optional[str]
    index_tree: str
    worktree_tree: str
    head_tree: Optional[str]
    dirty_files: List[str] = field(default_factory=list)

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_files)


def open_repo(path: Path) -> git.Repo:
    try:
        return git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise UsageError(f"{path} is not a git repository (set REPO_PATH). Nothing was changed.") from None


def _git(repo: git.Repo, *args: str, env: Optional[dict] = None, **kwargs) -> str:
    """One git command; its failure becomes an error a user can read."""
    try:
        if env is not None:
            kwargs["env"] = {**os.environ, **env}
        return repo.git.execute(["git", *args], **kwargs)
    except git.GitCommandError as exc:
        detail = (exc.stderr or "").strip().replace("stderr: ", "").strip("'\n ") or str(exc)
        raise GitFailed(f"git {args[0]} failed: {detail}") from None


def refuse_unsafe(repo: git.Repo, allow_detached: bool = True) -> None:
    """A merge or rebase in progress, a stale index.lock, a detached HEAD: say how to fix, change nothing."""
    gitdir = Path(repo.git_dir)
    if (gitdir / "index.lock").exists():
        raise UsageError(f"{gitdir / 'index.lock'} exists: another git process is running, or one crashed. "
                         "If no git command is running, remove that file. Nothing was changed.")
    for marker, what, fix in (("MERGE_HEAD", "a merge", "git merge --abort"),
                              ("rebase-merge", "a rebase", "git rebase --abort"),
                              ("rebase-apply", "a rebase or am", "git rebase --abort"),
                              ("CHERRY_PICK_HEAD", "a cherry-pick", "git cherry-pick --abort"),
                              ("REVERT_HEAD", "a revert", "git revert --abort")):
        if (gitdir / marker).exists():
            raise UsageError(f"{what} is in progress in {repo.working_tree_dir}: finish it or run `{fix}`. "
                             "Nothing was changed.")
    if not allow_detached and repo.head.is_detached:
        raise UsageError("HEAD is detached: check out the branch to roll back first "
                         "(git checkout <branch>). Nothing was changed.")


def capture(repo: git.Repo) -> RepoState:
    """The exact state as trees: the index, and the working tree (untracked files included,
    ignored ones not), written as git objects without touching the user's index."""
    commit = repo.head.commit.hexsha if repo.head.is_valid() else None
    branch = None if repo.head.is_detached else repo.head.ref.name
    index_tree = _git(repo, "write-tree")
    with tempfile.TemporaryDirectory(prefix="rollback-index-") as tmp:
        index = Path(tmp) / "index"
        real = Path(repo.git_dir) / "index"
        if real.exists():
            shutil.copy2(real, index)  # keeps stat data: unchanged files are not hashed again
        env = {"GIT_INDEX_FILE": str(index)}
        _git(repo, "add", "--all", "--", ".", env=env)
        worktree_tree = _git(repo, "write-tree", env=env)
    head_tree = repo.head.commit.tree.hexsha if commit else None
    status = _git(repo, "status", "--porcelain=v1", "--untracked-files=all", "-z")
    dirty = [entry[3:] for entry in status.split("\0") if len(entry) > 3]
    return RepoState(commit, branch, index_tree, worktree_tree, head_tree, dirty)


def backup(repo: git.Repo, parent: Path, reason: str = "") -> Path:
    """`<parent>/code_<ts>/`: a bundle of every ref plus commits holding the index and working tree."""
    refuse_unsafe(repo)
    state = capture(repo)
    partial = files.new_backup_dir(parent, PREFIX)
    tag = stamp()
    refs = {}
    try:
        parents = ["-p", state.commit] if state.commit else []
        for name, tree in (("index", state.index_tree), ("worktree", state.worktree_tree)):
            sha = _git(repo, "commit-tree", tree, *parents, "-m", f"rollback-toolkit {name} at {tag}", env=_IDENTITY)
            refs[name] = sha
            _git(repo, "update-ref", f"{_TMP_REFS}/{tag}/{name}", sha)
        _git(repo, "bundle", "create", str(partial / BUNDLE), "--all")
    finally:
        for name in refs:
            _git(repo, "update-ref", "-d", f"{_TMP_REFS}/{tag}/{name}")
    os.chmod(partial / BUNDLE, 0o600)
    meta = {"format_version": 1, "kind": "code", "repo_path": str(repo.working_tree_dir), "reason": reason,
            **asdict(state), "dirty": state.dirty, "index_commit": refs["index"], "worktree_commit": refs["worktree"],
            "bundle_sha256": files.sha256_of(partial / BUNDLE), "bundle_size": (partial / BUNDLE).stat().st_size}
    return files.finish_backup_dir(partial, METADATA, meta)


def load_backup(path: Path) -> dict:
    """A backup's metadata, after checking that its bundle is whole."""
    meta_path = path / METADATA
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{path} is not a code backup (no readable {METADATA}). Nothing was changed.") from None
    bundle = path / BUNDLE
    if not bundle.is_file() or files.sha256_of(bundle) != meta.get("bundle_sha256"):
        raise UsageError(f"the bundle in {path} is missing or does not match its checksum. Nothing was changed.")
    return meta


def restore(repo_path: Path, backup_path: Path, meta: dict) -> None:
    """Build the backed-up repository beside repo_path, then swap the two folders in one step.
    Ignored files (build output, local settings) are carried over by hard links."""
    repo_path = repo_path.resolve()
    remove_leftovers(repo_path)
    tmp = repo_path.parent / f".{repo_path.name}.rollback-{stamp()}"
    existing = None
    if (repo_path / ".git").exists():
        existing = open_repo(repo_path)
        refuse_unsafe(existing)
        files.link_or_copy_tree(Path(existing.git_dir), tmp / ".git")
        (tmp / ".git" / "index").unlink(missing_ok=True)
    else:
        tmp.mkdir()
        git.Repo.init(tmp)
    try:
        _build(git.Repo(tmp), backup_path / BUNDLE, meta, fresh=existing is None)
        if existing is not None:
            _carry_ignored(existing, tmp)
        testhooks.checkpoint("code-restore-built")
        if repo_path.exists():
            files.exchange(tmp, repo_path)
        else:
            os.rename(tmp, repo_path)
            files.fsync_dir(repo_path.parent)
        testhooks.checkpoint("code-restore-swapped")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after the swap it holds the old state (backed up first)


def _build(repo: git.Repo, bundle: Path, meta: dict, fresh: bool) -> None:
    ns = "refs/rollback-restore"
    _git(repo, "fetch", "--quiet", "--no-tags", str(bundle), f"+refs/*:{ns}/*")
    if fresh:  # an empty folder: the repository comes back whole, every branch and tag
        _git(repo, "fetch", "--quiet", str(bundle), "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
    if meta["branch"]:
        if meta["commit"]:
            _git(repo, "update-ref", f"refs/heads/{meta['branch']}", meta["commit"])
        _git(repo, "symbolic-ref", "HEAD", f"refs/heads/{meta['branch']}")
    elif meta["commit"]:
        _git(repo, "update-ref", "--no-deref", "HEAD", meta["commit"])
    with tempfile.TemporaryDirectory(prefix="rollback-index-") as tmpdir:
        env = {"GIT_INDEX_FILE": str(Path(tmpdir) / "index")}
        _git(repo, "read-tree", meta["worktree_tree"], env=env)
        _git(repo, "checkout-index", "--all", "--force", env=env)
    _git(repo, "read-tree", meta["index_tree"])
    _git(repo, "update-index", "-q", "--refresh", with_exceptions=False)
    for ref in _git(repo, "for-each-ref", "--format=%(refname)", ns).split():
        _git(repo, "update-ref", "-d", ref)


def _carry_ignored(old: git.Repo, tmp: Path) -> None:
    listing = _git(old, "ls-files", "-z", "--others", "--ignored", "--exclude-standard")
    root = Path(old.working_tree_dir)
    for rel in filter(None, listing.split("\0")):
        src, dst = root / rel, tmp / rel
        if dst.exists() or dst.is_symlink():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def remove_leftovers(repo_path: Path) -> None:
    """Folders of an interrupted restore: before the swap they are unfinished, after it they are
    the old state, which the automatic backup holds."""
    for leftover in repo_path.parent.glob(f".{repo_path.name}.rollback-*"):
        get_logger().warning("Removing %s, left by an interrupted run.", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def resolve_commit(repo: git.Repo, ref: str) -> str:
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except GitFailed:
        raise UsageError(f"{ref!r} is not a commit in {repo.working_tree_dir}. Nothing was changed.") from None


@dataclass
class RollbackResult:
    old_head: str
    new_head: str
    branch: str
    kept_ref: str
    stash: Optional[str] = None


def rollback(repo: git.Repo, commit: str) -> RollbackResult:
    """Stash local changes (named), keep the old head under refs/rollback/<ts>, reset the branch."""
    tag = stamp()
    old = repo.head.commit.hexsha
    branch = repo.head.ref.name
    kept = f"refs/rollback/{tag}"
    _git(repo, "update-ref", kept, old)
    stash = None
    if capture(repo).dirty:
        message = f"rollback-toolkit {tag}: local changes before rollback to {commit[:12]}"
        _git(repo, "stash", "push", "--include-untracked", "-m", message, env=_IDENTITY)
        stash = f"stash@{{0}} ({_git(repo, 'rev-parse', 'stash@{0}')[:12]}: {message})"
    _git(repo, "reset", "--hard", "--quiet", commit)
    return RollbackResult(old, commit, branch, kept, stash)


def publish(repo: git.Repo, deploy_dir: Path, commit: str) -> Path:
    """Export the commit's tree to releases/<ts>_<short>/, then point `current` at it atomically
    (new symlink renamed over the old); keep the newest releases and always the current one."""
    releases = deploy_dir / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    name = f"{stamp()}_{commit[:8]}"
    partial = releases / f".{name}.partial"
    partial.mkdir()
    with tempfile.TemporaryFile() as archive:
        repo.git.archive(commit, format="tar", output_stream=archive)
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            safe = {"filter": "tar"} if hasattr(tarfile, "data_filter") else {}  # Python 3.9.17+/3.11.4+
            tar.extractall(partial, **safe)
    files.write_json_atomic(partial / ".release.json", {"commit": commit, "created_at": utc_now().isoformat()})
    final = releases / name
    os.rename(partial, final)
    link_tmp = deploy_dir / f".current.tmp-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    os.symlink(os.path.join("releases", name), link_tmp)
    os.replace(link_tmp, deploy_dir / "current")
    files.fsync_dir(deploy_dir)
    prune_releases(deploy_dir)
    return final


def current_release(deploy_dir: Path) -> Optional[Path]:
    link = deploy_dir / "current"
    return (deploy_dir / os.readlink(link)).resolve() if link.is_symlink() else None


def prune_releases(deploy_dir: Path, keep: int = KEEP_RELEASES) -> None:
    releases = sorted((p for p in (deploy_dir / "releases").iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name, reverse=True)
    current = current_release(deploy_dir)
    for old in releases[keep:]:
        if current is None or old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)


def release_commit(release: Optional[Path]) -> Optional[str]:
    if release is None:
        return None
    try:
        return json.loads((release / ".release.json").read_text()).get("commit")
    except (OSError, ValueError):
        return None


def fsck(repo: git.Repo) -> List[str]:
    try:
        repo.git.execute(["git", "fsck", "--no-progress", "--no-dangling"])
        return []
    except git.GitCommandError as exc:
        return [line for line in (exc.stderr or "").splitlines() if line.strip()][-10:] or [str(exc)]
