"""A repository's working tree as it is on disk, in one tar archive (code backups, DESIGN §8).

Git's own objects cannot hold what a user may lose: a file marked --assume-unchanged is skipped by
`git add`, modes other than 644 and 755, owners, hard links, empty folders, CRLF files under
`text=auto` and `$Id$` under `ident` (checkout rewrites both), nested repositories, submodule
working trees. A tar archive keeps every one of them byte for byte. Ignored files stay out (build
output can be huge), but for those a restore or rollback would write over, which the caller names."""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

ARCHIVE = "worktree.tar"
MODULES = ".git/modules"  # submodules' own git folders: backed up beside their working trees


class Ignored:
    """The ignored paths of a working tree, as `git ls-files --others --ignored --directory` lists
    them: whole folders end in '/'."""

    def __init__(self, listing: Iterable[str]):
        self.files: Set[str] = set()
        self.dirs: Set[str] = set()
        for entry in listing:
            if entry.endswith("/"):
                self.dirs.add(entry.rstrip("/"))
            elif entry:
                self.files.add(entry)

    def covers(self, rel: str) -> bool:
        if rel in self.files or rel in self.dirs:
            return True
        parts = rel.split("/")
        return any("/".join(parts[:i]) in self.dirs for i in range(1, len(parts)))


def entries(root: Path, ignored: Ignored, include: Iterable[str] = ()) -> Iterator[Tuple[str, str]]:
    """(relative name, full path) of every file, folder and link under root but the top-level .git
    and the ignored ones (but those in `include`), folders before what they hold."""
    include = set(include)
    below = {"/".join(p.split("/")[:i]) for p in include for i in range(1, p.count("/") + 1)}
    for current, dirs, names in os.walk(root):
        rel_dir = os.path.relpath(current, root)
        prefix = "" if rel_dir == "." else rel_dir + "/"
        descend = []
        for name in sorted(dirs):
            rel, full = prefix + name, os.path.join(current, name)
            if rel == ".git":
                continue  # the repository's own git folder: the bundle and the index file hold it
            if ignored.covers(rel) and rel not in include:
                if rel in below:
                    descend.append(name)  # an ignored folder with a file the caller includes
                continue
            yield rel, full  # a link to a folder is kept as the link
            if not os.path.islink(full):
                descend.append(name)
        dirs[:] = descend
        for name in sorted(names):
            rel = prefix + name
            if rel == ".git" or (ignored.covers(rel) and rel not in include):
                continue
            yield rel, os.path.join(current, name)


def write(root: Path, dest: Path, ignored: Ignored, include: Iterable[str] = (), git_dir: Optional[Path] = None) -> int:
    """Archive every entry `entries` lists; with git_dir, its modules/ folder too. Returns the entries."""
    count = 0
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, full in entries(root, ignored, include):
            tar.add(full, arcname=rel, recursive=False)
            count += 1
        if git_dir is not None and (git_dir / "modules").is_dir():
            tar.add(str(git_dir / "modules"), arcname=MODULES, recursive=True)
    return count


def _sha256(fh) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def manifest_of_disk(root: Path, ignored: Ignored) -> Dict[str, tuple]:
    """What a user sees of each entry: a folder's mode, a link's target, a file's mode and sha256."""
    found = {}
    for rel, full in entries(root, ignored):
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", os.readlink(full))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("folder", stat.S_IMODE(st.st_mode))
        elif not stat.S_ISREG(st.st_mode):  # a FIFO, socket or device: never opened
            found[rel] = ("special", stat.S_IFMT(st.st_mode))
        else:
            with open(full, "rb") as fh:
                found[rel] = ("file", stat.S_IMODE(st.st_mode), _sha256(fh))
    return found


def manifest_of_archive(archive: Path, ignored: Ignored) -> Dict[str, tuple]:
    """The same, of a backup's archive (its submodules' git folders left out)."""
    found: Dict[str, tuple] = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.name == MODULES or m.name.startswith(MODULES + "/") or ignored.covers(m.name):
                continue
            if m.issym():
                found[m.name] = ("link", m.linkname)
            elif m.isdir():
                found[m.name] = ("folder", m.mode & 0o7777)
            elif m.islnk():
                target = found.get(m.linkname)
                found[m.name] = ("file", m.mode & 0o7777, target[2] if target else "")
            elif not m.isreg():
                found[m.name] = ("special", {tarfile.FIFOTYPE: stat.S_IFIFO, tarfile.CHRTYPE: stat.S_IFCHR,
                                             tarfile.BLKTYPE: stat.S_IFBLK}.get(m.type, 0))
            else:
                found[m.name] = ("file", m.mode & 0o7777, _sha256(tar.extractfile(m)))
    return found


def names(archive: Path) -> List[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def extract(archive: Path, dest: Path) -> None:
    """Unpack into dest exactly: bytes, modes, links, hard links, empty folders, and (as root) owners.
    The archive was written by write() and its checksum verified; its names are checked all the same."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        seen, links = set(), set()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts or not parts:
                raise ValueError(f"{archive} holds an entry outside the repository: {m.name!r}")
            if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                raise ValueError(f"{archive} holds an entry below a symbolic link: {m.name!r}")
            if m.issym():
                links.add("/".join(parts))
            if m.islnk() and m.linkname not in seen:
                raise ValueError(f"{archive} holds a hard link to an entry it does not have: {m.linkname!r}")
            seen.add(m.name)
            target = dest / m.name
            if not m.isdir() and os.path.lexists(target) and not os.path.isdir(target):
                # never write through: a file already there may be a hard link into the live
                # repository (git objects copied by link), read-only to its owner
                os.unlink(target)
        kwargs = {"numeric_owner": True}
        if hasattr(tarfile, "fully_trusted_filter"):  # Python 3.12+ (and backports): keep every mode as written
            kwargs["filter"] = "fully_trusted"
        tar.extractall(dest, members=members, **kwargs)
