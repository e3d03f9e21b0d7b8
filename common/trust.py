"""What the toolkit reads from disk is checked before it is used (DESIGN §3, "Trust nothing on disk").

The toolkit often runs as root, or as an owner with rights over many databases, and its folders
(BACKUP_DIR, the code and config backup folders, LOG_DIR, PG_BIN_DIR) may be shared. Like ssh's
StrictModes: a folder it reads or writes must belong to the running user or root and must not be
writable by group or others, nor may any folder above it be (a sticky one such as /tmp aside);
anything else is refused with one line naming the path, its owner and mode. Files are created with
O_NOFOLLOW|O_EXCL, so a link planted under a name the toolkit writes is never followed."""
from __future__ import annotations

import json
import os
import pwd
import re
import stat
from pathlib import Path
from typing import Optional

from .errors import ConfigError

MAX_JSON_BYTES = 16 * 1024 * 1024
FOLDER_SETTINGS = ("BACKUP_DIR", "LOG_DIR", "CODE_BACKUP_DIR", "CONFIG_BACKUP_DIR", "PG_BIN_DIR")
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*$")


class UntrustedPath(ConfigError):
    """A folder or file someone else could have written."""


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _me() -> str:
    return owner_name(os.geteuid())


def _fix(path: Path) -> str:
    return f"chown {_me()} '{path}' && chmod go-w '{path}'"


def _root_here() -> set:
    """The uids that stand for root: 0, and inside a user namespace (unshare -r) the kernel's overflow
    uid, which is how the host's root (owner of /, /tmp, /home) shows there."""
    uids = {0}
    try:
        with open("/proc/self/uid_map") as fh:
            first = fh.readline().split()
        if first[:3] != ["0", "0", "4294967295"]:
            with open("/proc/sys/kernel/overflowuid") as fh:
                uids.add(int(fh.read().strip()))
    except (OSError, ValueError, IndexError):
        pass
    return uids


def problem(path: Path, st: os.stat_result, ancestor: bool = False) -> Optional[str]:
    """Why a folder (or file) may not be trusted, or None."""
    mode = stat.S_IMODE(st.st_mode)
    what = f"owned by {owner_name(st.st_uid)} with mode {mode:04o}"
    if st.st_uid not in _root_here() | {os.geteuid()}:
        return f"{what}: it must belong to {_me()} or root"
    if mode & 0o022 and not (ancestor and mode & stat.S_ISVTX):
        return f"{what}: group or others may write to it"
    return None


def check_folder(path: Path, what: str) -> Path:
    """Refuse a folder (and any folder above it) that is a link, or that another user could write.
    A folder that does not exist yet is fine when the nearest existing one above it is."""
    path = Path(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UntrustedPath(f"{what} {path} is a symbolic link: the toolkit does not follow links for the folders it "
                                f"writes. Set {what} to the real folder ({os.path.realpath(path)}). Nothing was changed.")
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedPath(f"{what} {path} is not a folder. Nothing was changed.")
        why = problem(path, st)
        if why:
            raise UntrustedPath(f"{what} {path} is {why}. Nothing was changed. Fix it with: {_fix(path)}")
    for parent in path.parents:
        try:
            pst = os.stat(parent)  # a link above is fine where it leads somewhere trusted
        except FileNotFoundError:
            continue
        why = problem(parent, pst, ancestor=True)
        if why:
            raise UntrustedPath(f"{what} {path} lies in {parent}, which is {why}: another user could swap the folder. "
                                "Nothing was changed. Move it, or fix that folder.")
    return path


def ensure_folder(path: Path, what: str = "folder") -> Path:
    """Create the folder (and missing parents) 0700 when needed, check it, and make it 0700."""
    path = check_folder(Path(path), what)
    missing = []
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or problem(path, st):
        check_folder(path, what)  # raced: say why
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    return path


def create_file(path: Path, mode: int = 0o600, binary: bool = False):
    """A new file opened for writing, never through a link: whatever stood under the name is
    unlinked first (unlink removes a link, not what it points to), then O_CREAT|O_EXCL|O_NOFOLLOW."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    return os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"}))


def read_json(path: Path, limit: int = MAX_JSON_BYTES):
    """A JSON document from a regular file that is not a link, not over `limit` bytes, and not
    writable by others; raises ValueError saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the name is a symbolic link
            raise ValueError("it is a symbolic link") from None
        raise ValueError(exc.strerror or str(exc)) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("it is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"it is {st.st_size} bytes, over the {limit // (1024 * 1024)} MB a sidecar may have")
        why = problem(path, st)
        if why:
            raise ValueError(f"it is {why}")
        data = fh.read(limit + 1)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def plain_name(value, what: str) -> str:
    """A file or folder name recorded on disk: one plain component, nothing that leaves its folder."""
    if not isinstance(value, str) or not _PLAIN.match(value) or value in (".", "..") or len(value) > 255:
        raise ValueError(f"{what} {value!r} is not a plain file name inside its folder")
    return value


def inside(folder: Path, name, what: str) -> Path:
    """folder/name for a plain name, refused when it is a link."""
    path = Path(folder) / plain_name(name, what)
    if path.is_symlink():
        raise ValueError(f"{what} {path} is a symbolic link")
    return path


def executable(path: str) -> Optional[str]:
    """Why a client tool found in PG_BIN_DIR may not be run, or None."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError as exc:
        return exc.strerror
    why = problem(Path(real), st)
    return f"{real} is {why}" if why else None
