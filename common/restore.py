"""Checking and restoring rollback points (DESIGN §5)."""
from __future__ import annotations

from typing import Optional

from . import catalog
from .catalog import RollbackPoint
from .errors import BackupCorrupt, ToolFailed
from .log import get_logger
from .pgtools import archive_tool_major, find_tool, list_archive
from .progress import Progress


def verify_point(point: RollbackPoint, pg_bin_dir: Optional[str] = None) -> RollbackPoint:
    """Full check of a dump: size, sha256, and that pg_restore can read its table of contents."""
    progress = Progress("checking sha256", unit="")
    try:
        catalog.verify_checksum(point, on_progress=lambda done: progress.bytes(done, point.size_bytes))
    finally:
        progress.done()
    if point.kind == catalog.DUMP:
        major = archive_tool_major(point.tool_version)
        pg_restore = find_tool("pg_restore", major, pg_bin_dir, minimum=major,
                               purpose=f"an archive written by pg_dump {point.tool_version}")
        try:
            entries = list_archive(pg_restore, str(point.path))
        except ToolFailed as exc:
            point.status, point.problem = catalog.CORRUPT, f"pg_restore cannot read it: {exc}"
            raise BackupCorrupt(f"rollback point {point.id} is CORRUPT: {point.problem}") from None
        get_logger().debug("%s: %d archive entries readable by %s", point.id, entries, pg_restore.describe())
    point.status, point.problem = catalog.OK, ""
    return point
