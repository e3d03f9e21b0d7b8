"""What every part of the toolkit writes with: owner-only folders (common.trust), JSON files
replaced in one step and fsynced, file-name-safe slugs and timestamps."""
from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from . import trust


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form: [A-Za-z0-9_-] only (the sidecar keeps the exact text)."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")
    return s[:limit].rstrip("-_") or "db"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def stamp() -> str:
    """A local timestamp to the millisecond, for names of databases this toolkit creates."""
    t = time.time()
    return time.strftime("%Y%m%d_%H%M%S", time.localtime(t)) + f"_{int(t * 1000) % 1000:03d}"


def ensure_dir(folder: Path, what: str = "BACKUP_DIR") -> Path:
    """The backup folder (or one inside it), created 0700 (backups hold data), refused when it is
    a link or another user could write it (common.trust)."""
    return trust.ensure_folder(folder, what)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (so that a rename in it is on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file = fsync_path


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to *.partial, fsync, rename, fsync the folder: a reader sees the old file or the new."""
    tmp = path.with_name(path.name + ".partial")
    with trust.create_file(tmp) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
