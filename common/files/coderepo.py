"""Code rollback with GitPython (DESIGN §8): backups as git bundles plus the exact index and
working tree, restores that swap the whole folder at once, rollbacks that lose nothing."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import git

from .. import storage, trust
from ..errors import LockHeld, RollbackError, UsageError
from ..log import get_logger
from ..storage import stamp
from ..testing import testhooks
from . import folders, inplace, worktree

PREFIX, METADATA, BUNDLE, INDEX = "code", "metadata.json", "repo.bundle", "index"


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


# Every git command of the toolkit runs without hooks, without the fsmonitor command and without
# recursing into submodules: it often runs as root, in repositories whose hooks anyone with write
# access to them wrote, and a recursing reset would discard a submodule's uncommitted work.
SAFE = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "submodule.recurse=false")


def _git(repo: git.Repo, *args: str, env: Optional[dict] = None, **kwargs) -> str:
    """One git command (hooks and fsmonitor off); its failure becomes an error a user can read."""
    try:
        kwargs["env"] = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", **(env or {})}
        return repo.git.execute(["git", *SAFE, *args], **kwargs)
    except git.GitCommandError as exc:
        detail = (exc.stderr or "").strip().replace("stderr: ", "").strip("'\n ") or str(exc)
        raise GitFailed(f"git {args[0]} failed: {detail}") from None


def refuse_unsafe(repo: git.Repo, allow_detached: bool = True, lock_held: bool = False,
                  finishing: Optional[Path] = None) -> None:
    """A merge or rebase in progress, a stale index.lock, a detached HEAD, an interrupted in-place
    restore (but for the restore that finishes it): say how to fix, change nothing."""
    gitdir = Path(repo.git_dir)
    inplace.refuse_interrupted(Path(repo.working_tree_dir), gitdir, allow_backup=finishing)
    _remove_our_stale_lock(gitdir / "index.lock")
    holder = _lock_owner(gitdir / "index.lock")
    if holder is not None and holder != os.getpid():
        raise LockHeld(f"a code restore of {repo.working_tree_dir} is running (it holds {gitdir / 'index.lock'}: "
                       f"rollback-toolkit pid={holder}). Nothing was changed. Wait for it to finish, then run this again.")
    if not lock_held and (gitdir / "index.lock").exists() and not _ours(gitdir / "index.lock"):
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
    """The state as git sees it: HEAD, branch, the index as a tree, and every changed path, those
    whose edits git is told to ignore (--assume-unchanged, --skip-worktree) included."""
    commit = repo.head.commit.hexsha if repo.head.is_valid() else None
    branch = None if repo.head.is_detached else repo.head.ref.name
    try:
        index_tree = _git(repo, "write-tree")
    except GitFailed:  # e.g. intent-to-add entries: the index file itself is kept byte for byte
        index_tree = ""
    head_tree = repo.head.commit.tree.hexsha if commit else None
    status = _git(repo, "status", "--porcelain=v1", "--untracked-files=all", "-z")
    dirty = [entry[3:] for entry in status.split("\0") if len(entry) > 3]
    dirty += [f"{path} (edited, marked {flag})" for path, flag in flagged_edits(repo)]
    return RepoState(commit, branch, index_tree, "", head_tree, dirty)


def flagged_edits(repo: git.Repo) -> List[tuple]:
    """Files marked --assume-unchanged or --skip-worktree whose content on disk differs from the
    index: git status does not show them, and `git stash` does not save them."""
    found = []
    root = Path(repo.working_tree_dir)
    for line in _git(repo, "ls-files", "-v", "-s", "-z").split("\0"):
        if not line:
            continue
        tag, rest = line[0], line[2:]
        meta, _, path = rest.partition("\t")
        flag = "assume-unchanged" if tag.islower() else "skip-worktree" if tag == "S" else None
        if flag is None:
            continue
        blob = meta.split()[1]
        disk = root / path
        if not disk.is_file() and not disk.is_symlink():
            continue
        if disk.is_symlink() or _git(repo, "hash-object", "--", path) != blob:
            found.append((path, flag))
    return found


def ignored_paths(repo: git.Repo, folders: bool = True) -> List[str]:
    """Ignored files of the working tree (with folders=True, a wholly ignored folder as 'name/')."""
    args = ["ls-files", "-z", "--others", "--ignored", "--exclude-standard"] + (["--directory"] if folders else [])
    return [p for p in _git(repo, *args).split("\0") if p]


def backup(repo: git.Repo, parent: Path, reason: str = "", include_ignored: Iterable[str] = ()) -> Path:
    """`<parent>/code_<ts>/`: a bundle of every ref (the history), the index file byte for byte
    (flags and intent-to-add entries included), and the working tree as it is on disk (common.files.worktree);
    ignored files only those named in include_ignored (those a restore or rollback would write over)."""
    refuse_unsafe(repo)
    state = capture(repo)
    gitdir = Path(repo.git_dir)
    partial = folders.new_backup_dir(parent, PREFIX)
    shallow = (gitdir / "shallow").exists()
    if state.commit:
        _git(repo, "bundle", "create", str(partial / BUNDLE), "--all")
    else:
        (partial / BUNDLE).write_bytes(b"")  # no commit yet: nothing for a bundle to hold
    include = sorted(set(include_ignored))
    entries = worktree.write(Path(repo.working_tree_dir), partial / worktree.ARCHIVE,
                             worktree.Ignored(ignored_paths(repo)), include, gitdir)
    if (gitdir / "index").exists():
        shutil.copyfile(gitdir / "index", partial / INDEX)
    for name in (BUNDLE, worktree.ARCHIVE, INDEX):
        if (partial / name).exists():
            os.chmod(partial / name, 0o600)
    meta = {"format_version": 2, "kind": "code", "repo_path": str(repo.working_tree_dir), "reason": reason,
            **asdict(state), "dirty": state.dirty, "shallow": shallow, "ignored_included": include,
            "bundle_sha256": folders.sha256_of(partial / BUNDLE), "bundle_size": (partial / BUNDLE).stat().st_size,
            "worktree_sha256": folders.sha256_of(partial / worktree.ARCHIVE), "worktree_entries": entries,
            "index_sha256": folders.sha256_of(partial / INDEX) if (partial / INDEX).exists() else None}
    return folders.finish_backup_dir(partial, METADATA, meta)


def load_backup(path: Path) -> dict:
    """A backup's metadata, after checking its bundle, working-tree archive and index file."""
    meta_path = path / METADATA
    try:
        meta = trust.read_json(meta_path)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a code backup ({METADATA}: {exc}). Nothing was changed.") from None
    checks = [(BUNDLE, "bundle_sha256")]
    if meta.get("format_version", 1) >= 2:
        checks += [(worktree.ARCHIVE, "worktree_sha256")] + ([(INDEX, "index_sha256")] if meta.get("index_sha256") else [])
    for name, key in checks:
        part = path / name
        if not part.is_file() or part.is_symlink() or folders.sha256_of(part) != meta.get(key):
            raise UsageError(f"the {name} in {path} is missing or does not match its checksum. Nothing was changed.")
    return meta


def refuse_layout(repo_path: Path) -> None:
    """Layouts no restore may touch, refused with nothing changed: as root, another user's repository
    (its new files would be root's). A git folder elsewhere and a sparse checkout are restored in place."""
    if not (repo_path / ".git").exists():
        return
    owner = repo_path.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        who = trust.owner_name(owner)
        raise UsageError(f"{repo_path} belongs to {who}: as root, a restore would leave its new files root's. Run "
                         f"it as {who} (sudo -u {who} ...). Nothing was changed.")


def restore_preview(repo_path: Path, backup_path: Path, meta: dict) -> dict:
    """What a restore would write over beyond tracked files, for the confirmation: ignored files the
    backup has at the same path, untracked nested repositories and submodule working trees."""
    found = {"ignored": [], "nested": [], "submodules": []}
    if inplace.git_dir_of(repo_path) is None:
        return found
    repo = open_repo(repo_path)
    archived = set(worktree.names(backup_path / worktree.ARCHIVE)) if meta.get("format_version", 1) >= 2 else set()
    found["ignored"] = sorted(set(ignored_paths(repo, folders=False)) & archived)
    found["nested"] = sorted(p.rstrip("/") for p in _git(repo, "ls-files", "-z", "--others", "--directory",
                                                           "--exclude-standard").split("\0")
                             if p.endswith("/") and (repo_path / p / ".git").exists())
    found["submodules"] = sorted(line.split("\t", 1)[1] for line in _git(repo, "ls-files", "-s", "-z").split("\0")
                                 if line.startswith("160000 "))
    return found


_LOCK_TEXT = "rollback-toolkit restore pid="


def _lock_owner(lock: Path) -> Optional[int]:
    """The pid of the toolkit run that holds a repository's index.lock (None: git's own, or none)."""
    try:
        with open(lock, "rb") as fh:
            head = fh.read(64).decode("ascii", "replace")
    except OSError:
        return None
    if not head.startswith(_LOCK_TEXT):
        return None
    try:
        return int(head[len(_LOCK_TEXT):].split()[0])
    except (ValueError, IndexError):
        return None


def _ours(lock: Path) -> bool:
    return _lock_owner(lock) == os.getpid()


def _remove_our_stale_lock(lock: Path) -> None:
    """An index.lock left by a toolkit restore that was killed (its pid is gone) is removed."""
    pid = _lock_owner(lock)
    if pid is None or pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
        return
    get_logger().warning("Removing %s, left by an interrupted restore (pid %d).", lock, pid)
    lock.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(repo_path: Path):
    """Git's own index.lock, held for a whole restore: a `git commit` (or any index change) in the
    repository fails at once instead of landing in the state the swap then replaces."""
    git_dir = inplace.git_dir_of(repo_path)
    if git_dir is None:
        yield
        return
    lock = git_dir / "index.lock"
    _remove_our_stale_lock(lock)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise UsageError(f"{lock} exists: another git process is running, or one crashed. If no git command is "
                         "running, remove that file. Nothing was changed.") from None
    os.write(fd, f"{_LOCK_TEXT}{os.getpid()}\n".encode())  # git only ever creates it with O_EXCL, never reads it
    os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass  # swapped away with the old tree


def refs_of(git_dir: Path, repo: git.Repo, skip: Optional[str] = None) -> str:
    """HEAD and every ref with its object (those under `skip` left out): equal before and after
    means no commit, branch or tag moved meanwhile."""
    listing = _git(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    return (git_dir / "HEAD").read_text() + "\n".join(x for x in listing if not (skip and x.startswith(skip + "/")))


def _refs(repo_path: Path) -> str:
    return refs_of(repo_path / ".git", git.Repo(repo_path))


def restore(repo_path: Path, backup_path: Path, meta: dict,
            backup_first: Optional[Callable[[List[str]], Path]] = None) -> bool:
    """Put the repository back as the backup has it, holding its index.lock throughout
    (backup_first(ignored files at risk) takes the automatic backup under it): by a folder swap, or
    in place where a swap would break the layout (common.files.inplace). Ignored files are kept, those the
    backup has at the same path being in the automatic backup. Returns whether the folder was swapped."""
    repo_path = repo_path.resolve()
    refuse_layout(repo_path)
    if meta.get("shallow") and not (repo_path / ".git").is_dir():
        raise UsageError(f"the backup is of a shallow clone: its bundle cannot rebuild a repository where none is. "
                         f"Clone the repository into {repo_path} first, then restore. Nothing was changed.")
    if repo_path.is_dir() and not (repo_path / ".git").exists() and any(repo_path.iterdir()):
        raise UsageError(f"{repo_path} is not a git repository and is not empty: a restore would replace files no "
                         "backup holds. Move them away, or set REPO_PATH to the repository. Nothing was changed.")
    with locked(repo_path):
        remove_leftovers(repo_path)  # under the lock: a running restore's folders are its own
        existing = open_repo(repo_path) if (repo_path / ".git").exists() else None
        if existing is not None:
            refuse_unsafe(existing, lock_held=True, finishing=backup_path)
        in_place = existing is not None and inplace.why_in_place(repo_path)
        if in_place:
            inplace.restore(repo_path, backup_path, meta, Path(existing.git_dir), backup_first)
        else:
            _swap(repo_path, backup_path, meta, existing, backup_first)
    if in_place:  # the index's file times, now that index.lock is free
        _git(open_repo(repo_path), "update-index", "-q", "--refresh", with_exceptions=False)
    return not in_place


def _swap(repo_path: Path, backup_path: Path, meta: dict, existing: Optional[git.Repo],
          backup_first: Optional[Callable[[List[str]], Path]]) -> None:
    """Build the backed-up repository beside repo_path, then exchange the two folders in one step."""
    if backup_first is not None and existing is not None:
        backup_first(restore_preview(repo_path, backup_path, meta)["ignored"])
    before = _refs(repo_path) if existing is not None else None
    tmp = repo_path.parent / f".{repo_path.name}.rollback-{stamp()}"
    if existing is not None:
        _copy_git_dir(Path(existing.git_dir), tmp / ".git")
    else:
        tmp.mkdir()
        _git(git.Repo.init(tmp), "config", "core.bare", "false")
    try:
        _build(git.Repo(tmp), backup_path, meta, fresh=existing is None)
        if existing is not None:
            _carry_ignored(existing, tmp)
        testhooks.checkpoint("code-restore-built")
        if existing is not None and _refs(repo_path) != before:
            raise RollbackError(f"{repo_path} changed while the restore was being built (a commit, a branch or "
                                "a tag moved): nothing was changed. Run the restore again.")
        if repo_path.exists():
            folders.exchange(tmp, repo_path)
        else:
            os.rename(tmp, repo_path)
            storage.fsync_dir(repo_path.parent)
        testhooks.checkpoint("code-restore-swapped")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after the swap it holds the old state (backed up first)


def _copy_git_dir(src: Path, dst: Path) -> None:
    """A copy of the git folder for the new tree: objects by hard link (git never rewrites them),
    everything else (reflogs, refs, config) copied, so a failed restore leaves the live one untouched."""
    def copy(s: str, d: str) -> None:
        if os.path.basename(s) == "index.lock":
            return
        if os.path.commonpath([s, str(src / "objects")]) == str(src / "objects"):
            try:
                os.link(s, d)
                return
            except OSError:
                pass
        shutil.copy2(s, d)
    shutil.copytree(src, dst, symlinks=True, copy_function=copy)
    (dst / "index").unlink(missing_ok=True)


def _build(repo: git.Repo, backup_path: Path, meta: dict, fresh: bool) -> None:
    bundle = backup_path / BUNDLE
    ns = "refs/rollback-restore"
    if bundle.stat().st_size:
        _git(repo, "fetch", "--quiet", "--no-tags", str(bundle), f"+refs/*:{ns}/*")
        if fresh:  # an empty folder: the repository comes back whole, every branch and tag
            _git(repo, "fetch", "--quiet", str(bundle), "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
    if meta["branch"]:
        if meta["commit"]:
            _git(repo, "update-ref", f"refs/heads/{meta['branch']}", meta["commit"])
        _git(repo, "symbolic-ref", "HEAD", f"refs/heads/{meta['branch']}")
    elif meta["commit"]:
        _git(repo, "update-ref", "--no-deref", "HEAD", meta["commit"])
    root = Path(repo.working_tree_dir)
    if meta.get("format_version", 1) >= 2:
        # The working tree as it was on disk, and the index file as it was (flags and all).
        worktree.extract(backup_path / worktree.ARCHIVE, root)
        if meta.get("index_sha256"):
            shutil.copyfile(backup_path / INDEX, root / ".git" / "index")
            _git(repo, "update-index", "-q", "--refresh", with_exceptions=False)
    else:  # a backup made before the archive: its trees, checked out
        with tempfile.TemporaryDirectory(prefix="rollback-index-") as tmpdir:
            env = {"GIT_INDEX_FILE": str(Path(tmpdir) / "index")}
            _git(repo, "read-tree", meta["worktree_tree"], env=env)
            _git(repo, "checkout-index", "--all", "--force", env=env)
        _git(repo, "read-tree", meta["index_tree"])
        _git(repo, "update-index", "-q", "--refresh", with_exceptions=False)
    for ref in _git(repo, "for-each-ref", "--format=%(refname)", ns).split():
        _git(repo, "update-ref", "-d", ref)


def _carry_ignored(old: git.Repo, tmp: Path) -> None:
    """Ignored files of the live tree into the new one by hard link, where the backup put nothing."""
    root = Path(old.working_tree_dir)
    for rel in ignored_paths(old, folders=False):
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


def left_behind(repo: git.Repo, commit: Optional[str]) -> Optional[str]:
    """The commit, when no branch contains it any more (only the reflog and the backups do)."""
    if not commit:
        return None
    holders = _git(repo, "for-each-ref", "--contains", commit, "--format=%(refname)", "refs/heads",
                   with_exceptions=False)
    return None if holders.strip() else commit


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


def rollback_at_risk(repo: git.Repo, commit: str) -> List[str]:
    """Ignored files that `reset --hard` to the commit would write over: those at a path it tracks
    (a file once committed, now ignored, such as a local config holding a password)."""
    tracked = set(_git(repo, "ls-tree", "-r", "-z", "--name-only", commit).split("\0"))
    return sorted(set(ignored_paths(repo, folders=False)) & tracked)


def rollback(repo: git.Repo, commit: str, expected_head: Optional[str] = None) -> RollbackResult:
    """Stash local changes (the stash is named by its own object, never by position), keep the old
    head under refs/rollback/<ts>, reset the branch. Refused when HEAD moved since it was planned."""
    tag = stamp()
    old = repo.head.commit.hexsha
    if expected_head and old != expected_head:
        raise RollbackError(f"HEAD moved from {expected_head[:12]} to {old[:12]} since the confirmation (a commit was "
                            "made meanwhile): nothing was changed. Run the rollback again.")
    branch = repo.head.ref.name
    kept = f"refs/rollback/{tag}"
    _git(repo, "update-ref", kept, old)
    stash = None
    if capture(repo).dirty:
        message = f"rollback-toolkit {tag}: local changes before rollback to {commit[:12]}"
        previous = _git(repo, "rev-parse", "-q", "--verify", "refs/stash", with_exceptions=False).strip()
        _git(repo, "stash", "push", "--include-untracked", "-m", message, env=_IDENTITY)
        made = _git(repo, "rev-parse", "-q", "--verify", "refs/stash", with_exceptions=False).strip()
        if made and made != previous and message in _git(repo, "log", "-1", "--format=%s", made):
            stash = f"{made[:12]} ({message}; git stash apply {made[:12]})"
    _git(repo, "reset", "--hard", "--quiet", commit)
    return RollbackResult(old, commit, branch, kept, stash)


def drift(repo: git.Repo, backup_path: Path, meta: dict) -> dict:
    """How the repository differs from a backup: HEAD and branch, and each working-tree entry
    (content, mode, link target) added, removed or changed; ignored files left out."""
    state = capture(repo)
    found = {"head": None, "added": [], "removed": [], "changed": []}
    if (state.commit, state.branch) != (meta.get("commit"), meta.get("branch")):
        found["head"] = (f"HEAD is {(state.commit or '-')[:12]} on {state.branch or 'detached HEAD'}, the backup has "
                         f"{(meta.get('commit') or '-')[:12]} on {meta.get('branch') or 'detached HEAD'}")
    if meta.get("format_version", 1) < 2:
        return found  # a backup made before the working-tree archive: HEAD only
    ignored = worktree.Ignored(ignored_paths(repo))
    now = worktree.manifest_of_disk(Path(repo.working_tree_dir), ignored)
    then = worktree.manifest_of_archive(backup_path / worktree.ARCHIVE, ignored)
    found["added"] = sorted(set(now) - set(then))
    found["removed"] = sorted(set(then) - set(now))
    found["changed"] = sorted(k for k in set(now) & set(then) if now[k] != then[k])
    return found


def fsck(repo: git.Repo) -> List[str]:
    try:
        repo.git.execute(["git", *SAFE, "fsck", "--no-progress", "--no-dangling"])
        return []
    except git.GitCommandError as exc:
        return [line for line in (exc.stderr or "").splitlines() if line.strip()][-10:] or [str(exc)]
