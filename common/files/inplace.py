"""Code restore in place (DESIGN §8), for the layouts a folder swap would break: a git folder that
lives elsewhere (`--separate-git-dir`, a linked worktree) and a sparse checkout. The working tree is
rewritten where it is, file by file, under git's own index.lock, after the automatic backup:

1. the backup's working tree is unpacked beside the repository and its bundle fetched (objects only);
2. a marker in the git folder names the backup: from here on the tree is being rewritten;
3. what the current tree has and the backup does not is removed (ignored files stay), every entry of
   the backup is renamed into place (each file replaced in one step), folders get their modes;
4. the branch, HEAD and the index file are set as the backup has them; the marker goes.

A kill in step 3 or 4 leaves the marker: every later command of code_rollback.py says so and names
the one command that finishes the job (the same restore again, which is idempotent) and the
automatic backup that holds the state before it."""
from __future__ import annotations

import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Callable, List, Optional

import git

from .. import storage, trust
from ..errors import RollbackError, UsageError
from ..storage import stamp, utc_now
from ..testing import testhooks
from . import worktree

MARK = "rollback-in-place.json"


def git_dir_of(repo_path: Path) -> Optional[Path]:
    """The repository's git folder, wherever it lives (None: not a repository)."""
    dot = repo_path / ".git"
    if dot.is_dir():
        return dot
    if not dot.is_file():
        return None
    try:
        return Path(git.Repo(repo_path).git_dir)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None


def why_in_place(repo_path: Path) -> Optional[str]:
    """Why this repository is restored in place rather than by a folder swap (None: a swap is right)."""
    dot = repo_path / ".git"
    if dot.is_file():
        return "its git folder lives elsewhere (--separate-git-dir or a linked worktree)"
    if dot.is_dir():
        from .coderepo import _git  # noqa: PLC0415 (coderepo imports this module)
        if _git(git.Repo(repo_path), "config", "--bool", "core.sparseCheckout", with_exceptions=False).strip() == "true":
            return "it is a sparse checkout"
    return None


def interrupted(git_dir: Path) -> Optional[dict]:
    """The marker of an in-place restore that did not finish (None: none, or its run is alive)."""
    mark = git_dir / MARK
    if not mark.exists():
        return None
    try:
        found = trust.read_json(mark)
    except (OSError, ValueError):
        found = {}
    if not isinstance(found, dict):
        found = {}
    pid = found.get("pid")
    started = found.get("pid_start")
    if isinstance(pid, int) and pid != os.getpid() and started is not None and process_start(pid) == started:
        return None  # still running (the same process: its pid and start time): its index.lock says so
    return found


def process_start(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat), so that a pid reused
    after a kill or a reboot is not taken for the run that wrote a marker; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def refuse_interrupted(repo_path: Path, git_dir: Path, allow_backup: Optional[Path] = None) -> None:
    """Refuse every command but the restore that finishes an interrupted in-place restore."""
    found = interrupted(git_dir)
    if found is None:
        return
    backup = str(found.get("backup") or "")
    if allow_backup is not None and backup == str(allow_backup):
        return
    before = found.get("automatic_backup")
    raise UsageError(
        f"an in-place restore of {repo_path} from {backup or '(unknown backup)'} was interrupted at "
        f"{found.get('started_at', '?')}: its files are partly rewritten. Finish it with "
        f"`python3 code_rollback.py restore {backup or '<backup>'} --yes`"
        + (f"; the state before it is in {before}" if before else "") + ". Nothing was changed.")


def restore(repo_path: Path, backup_path: Path, meta: dict, git_dir: Path,
            backup_first: Optional[Callable[[List[str]], Optional[Path]]]) -> None:
    """Rewrite the working tree, refs and index of repo_path as the backup has them (see above).
    The caller holds the repository's index.lock."""
    from . import coderepo  # noqa: PLC0415 (coderepo imports this module)
    repo = git.Repo(repo_path)
    if meta.get("branch"):
        _refuse_branch_checked_out_elsewhere(repo, meta["branch"], git_dir)
    resuming = interrupted(git_dir)  # the same restore, killed part-way: the state before it is backed up
    if resuming is not None and isinstance(resuming.get("ignored"), list):
        listing = [p for p in resuming["ignored"] if isinstance(p, str)]  # what was ignored before it began
    else:
        listing = coderepo.ignored_paths(repo)
    ignored = worktree.Ignored(listing)
    stage = repo_path.parent / f".{repo_path.name}.rollback-{stamp()}"
    with tarfile.open(backup_path / worktree.ARCHIVE) as tar:
        members = tar.getmembers()
    modules = any(m.name == worktree.MODULES for m in members)
    _refuse_other_file_systems(repo_path, git_dir if modules else None, stage.parent)
    _refuse_ignored_under_files(repo_path, {m.name for m in members if not m.isdir()}, ignored)
    if resuming is not None:
        auto = resuming.get("automatic_backup") or None
    else:
        auto = backup_first(coderepo.restore_preview(repo_path, backup_path, meta)["ignored"]) if backup_first else None
    before = coderepo.refs_of(git_dir, repo)
    stage.mkdir(mode=0o700)
    ns = "refs/rollback-restore"
    try:
        worktree.extract(backup_path / worktree.ARCHIVE, stage)
        if (backup_path / coderepo.BUNDLE).stat().st_size:
            coderepo._git(repo, "fetch", "--quiet", "--no-tags", str(backup_path / coderepo.BUNDLE), f"+refs/*:{ns}/*")
        testhooks.checkpoint("code-restore-built")
        if coderepo.refs_of(git_dir, repo, skip=ns) != before:
            raise RollbackError(f"{repo_path} changed while the restore was being prepared (a commit, a branch or a "
                                "tag moved): nothing was changed. Run the restore again.")
        storage.write_json_atomic(git_dir / MARK, {"backup": str(backup_path), "automatic_backup": str(auto or ""),
                                                   "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                                                   "started_at": utc_now().isoformat(), "ignored": listing})
        _apply(repo_path, stage, git_dir, ignored)
        testhooks.checkpoint("code-restore-swapped")
        if meta["branch"]:
            if meta["commit"]:
                coderepo._git(repo, "update-ref", f"refs/heads/{meta['branch']}", meta["commit"])
            coderepo._git(repo, "symbolic-ref", "HEAD", f"refs/heads/{meta['branch']}")
        elif meta["commit"]:
            coderepo._git(repo, "update-ref", "--no-deref", "HEAD", meta["commit"])
        if meta.get("index_sha256"):
            shutil.copyfile(backup_path / coderepo.INDEX, git_dir / "index")  # we hold index.lock
        (git_dir / MARK).unlink()
    finally:
        for ref in coderepo._git(repo, "for-each-ref", "--format=%(refname)", ns).split():
            coderepo._git(repo, "update-ref", "-d", ref)
        shutil.rmtree(stage, ignore_errors=True)


def _refuse_other_file_systems(repo_path: Path, git_dir: Optional[Path], stage_parent: Path) -> None:
    """Every entry is renamed into place from a folder beside the repository, and the submodules'
    git folders (git_dir, when the backup has them) into the git folder: all must be on one file
    system (a bind-mounted repository or a git folder on another disk would fail half-way)."""
    places = [repo_path, stage_parent] + ([git_dir] if git_dir is not None else [])
    if len({os.stat(place).st_dev for place in places}) > 1:
        raise UsageError(f"{', '.join(str(x) for x in places)} are not all on one file system: an in-place restore "
                         "renames files between them. Restore it by hand from the backup's bundle and archive. "
                         "Nothing was changed.")


def _refuse_ignored_under_files(repo_path: Path, files: set, ignored: worktree.Ignored) -> None:
    """A folder that holds ignored files, where the backup has a file or a link (`files`): replacing
    it would delete ignored files no backup holds."""
    lost = sorted(rel for rel in ignored.files | ignored.dirs
                  if any("/".join(rel.split("/")[:i]) in files for i in range(1, rel.count("/") + 1)))
    if lost:
        raise UsageError(f"the backup has a file where {repo_path} has a folder holding ignored files ("
                         f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}): restoring it would delete them. "
                         "Move them away first. Nothing was changed.")


def _refuse_branch_checked_out_elsewhere(repo: git.Repo, branch: str, git_dir: Path) -> None:
    """Each worktree's HEAD lives in its own git folder: the main one's in the common folder, a
    linked one's under worktrees/<name>/ (with a gitdir file naming its working tree)."""
    common = Path(repo.common_dir).resolve()
    wanted = f"ref: refs/heads/{branch}"
    for other in [common] + sorted((common / "worktrees").glob("*")):
        if other.resolve() == git_dir.resolve():
            continue
        try:
            head = (other / "HEAD").read_text().strip()
        except OSError:
            continue
        if head == wanted:
            where = "the main worktree" if other == common else \
                str(Path((other / "gitdir").read_text().strip()).parent) if (other / "gitdir").exists() else other.name
            raise UsageError(f"the backup's branch {branch} is checked out in another worktree ({where}): restoring "
                             "it here would move that worktree's branch under it. Check out another branch there "
                             "first. Nothing was changed.")


def _apply(root: Path, stage: Path, git_dir: Path, ignored: worktree.Ignored) -> None:
    """Make root's working tree what stage holds; ignored entries not in stage stay as they are."""
    modules = stage / ".git" / "modules"
    if modules.is_dir():  # submodules' own git folders live in the (possibly separate) git folder
        if (git_dir / "modules").exists():
            os.rename(git_dir / "modules", stage / ".git" / "modules.old")
        os.rename(modules, git_dir / "modules")
    new = set()
    for current, dirs, names in os.walk(stage):
        rel_dir = os.path.relpath(current, stage)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d != ".git"]
        prefix = "" if rel_dir == "." else rel_dir + "/"
        new.update(prefix + n for n in dirs + names)
    # what the backup does not have goes (the automatic backup holds it), ignored files but those stay
    for current, dirs, names in os.walk(root, topdown=False):
        rel_dir = os.path.relpath(current, root)
        if rel_dir == ".git" or rel_dir.startswith(".git/"):
            continue
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in names + dirs:
            rel = prefix + name
            if rel == ".git" or rel in new or ignored.covers(rel):
                continue
            path = root / rel
            if path.is_dir() and not path.is_symlink():
                try:
                    path.rmdir()
                except OSError:
                    pass  # it still holds ignored files
            else:
                path.unlink()
    # every entry of the backup into place, top down; folders' modes last, deepest first
    made = []
    for current, dirs, names in os.walk(stage):
        rel_dir = os.path.relpath(current, stage)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d != ".git"]
        prefix = "" if rel_dir == "." else rel_dir + "/"
        links = [d for d in dirs if os.path.islink(stage / (prefix + d))]  # moved below, as links
        dirs[:] = [d for d in dirs if d not in links]
        for name in dirs:
            src, dst = stage / (prefix + name), root / (prefix + name)
            if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst)):
                os.unlink(dst)
            if not os.path.lexists(dst):
                os.mkdir(dst, 0o700)
            made.append((src, dst))
        for name in names + links:
            src, dst = stage / (prefix + name), root / (prefix + name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)  # a folder that is a file in the backup
            os.rename(src, dst)
    for src, dst in reversed(made):
        st = os.lstat(src)
        if os.geteuid() == 0:
            os.lchown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    storage.fsync_dir(root)
