"""Files and folders written so that a reader sees the old version or the new, never half of one."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

from .. import trust
from ..errors import LockHeld, UsageError
from ..storage import fsync_dir, stamp, utc_now, write_json_atomic


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temporary file in the same folder, fsync, rename over the target, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with trust.create_file(tmp, mode, binary=True) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask must not narrow the mode we restore
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def sync_filesystem(path: Path) -> None:
    """Flush every file of path's filesystem to disk in one call (Linux syncfs; else sync): cheaper
    than one fsync per file when a thousand files were just written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def replace_many(items: List[tuple], on_each=None) -> None:
    """Put several files in place, each atomically: write every one to a temporary name beside it,
    flush them all to disk at once, then rename each over its target and fsync the folders. A kill
    at any moment leaves every file whole: its old version or its new one. items: (path, data, mode)."""
    if not items:
        return
    temps = []
    try:
        for path, data, mode in items:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with trust.create_file(tmp, mode, binary=True) as fh:
                fh.write(data)
            os.chmod(tmp, mode)  # the umask must not narrow the mode we restore
            temps.append((tmp, path))
        sync_filesystem(items[0][0].parent)
        for tmp, path in temps:
            os.replace(tmp, path)
            if on_each:
                on_each(path)
    except BaseException:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()
        raise
    for folder in {path.parent for _, path in temps}:
        fsync_dir(folder)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): no moment without either."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError("renameat2 is not available on this system")
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")
    fsync_dir(Path(a).parent)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree by hard links where possible (git never rewrites its files in place)."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, symlinks=True, copy_function=link)


@dataclass
class BackupDir:
    path: Path
    metadata: dict

    @property
    def created(self) -> float:
        try:
            return datetime.fromisoformat(self.metadata.get("created_at", "")).timestamp()
        except ValueError:
            return self.path.stat().st_mtime


def new_backup_dir(parent: Path, prefix: str) -> Path:
    """`<parent>/<prefix>_<ts>.partial`, 0700; rename it to finish (see finish_backup_dir)."""
    trust.ensure_folder(parent, "backup folder")
    while True:
        path = parent / f"{prefix}_{stamp()}.partial"
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            time.sleep(0.002)


def finish_backup_dir(partial: Path, metadata_name: str, metadata: dict) -> Path:
    """Write the metadata last, then drop the .partial suffix: a backup is complete or absent."""
    metadata.setdefault("created_at", utc_now().isoformat(timespec="seconds"))
    write_json_atomic(partial / metadata_name, metadata)
    final = partial.with_suffix("")
    os.replace(partial, final)
    fsync_dir(final.parent)
    return final


def list_backups(parent: Path, prefix: str, metadata_name: str) -> List[BackupDir]:
    """Complete backups, newest first (a folder without readable metadata is not one)."""
    found = []
    if not parent.is_dir():
        return found
    for path in parent.glob(f"{prefix}_*"):
        if path.suffix == ".partial" or not path.is_dir():
            continue
        try:
            meta = json.loads((path / metadata_name).read_text())
        except (OSError, ValueError):
            continue
        found.append(BackupDir(path, meta))
    return sorted(found, key=lambda b: (b.created, b.path.name), reverse=True)


def old_backups(backups: List[BackupDir], days: float, now: Optional[float] = None) -> List[BackupDir]:
    """Backups older than `days`, never the newest one."""
    if days < 0:
        raise UsageError("DAYS must be 0 or more")
    now = now or time.time()
    return [b for b in backups[1:] if (now - b.created) / 86400 > days]


def remove_leftover_partials(parent: Path, prefix: str, quiet_seconds: int = 600) -> List[Path]:
    removed = []
    if parent.is_dir():
        for path in parent.glob(f"{prefix}_*.partial"):
            if time.time() - path.stat().st_mtime > quiet_seconds:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


class FolderLock:
    """One code or configuration operation at a time: an flock on `<folder>/.lock` (or another
    name), released by the kernel when the process dies, however it dies. A second holder is
    refused at once, by name."""

    def __init__(self, folder: Path, script: str, name: str = ".lock", what: Optional[str] = None):
        self.path = folder / name
        self.script = script
        self.what = what or f"operation on {folder}"
        self.fd: Optional[int] = None

    def __enter__(self) -> "FolderLock":
        import fcntl
        trust.ensure_folder(self.path.parent, "backup folder")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(f"another {self.what} is running ({holder}). Nothing was changed. "
                           "Wait for it to finish, then run this again.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.script} pid={os.getpid()} since {utc_now().isoformat(timespec='seconds')}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
