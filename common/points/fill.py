"""Filling a database from a rollback point's dump (DESIGN §5): the pg_restore that can read it
(never older than the pg_dump that wrote it; a newer one through its script into psql), the full
check of a dump, and its sha256 read beside the restore."""
from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from typing import List, Optional

from ..errors import BackupCorrupt, RestoreFailed, ToolFailed, UsageError
from ..log import get_logger
from ..pg import dbprops
from ..pg.database import ConnInfo
from ..pg.pgtools import Tool, archive_tool_major, find_tool, list_archive
from ..progress import Progress, human_size
from ..runner import Process, run
from . import catalog, snapshot
from .catalog import RollbackPoint


def verify_point(point: RollbackPoint, pg_bin_dir: Optional[str] = None,
                 info: Optional[ConnInfo] = None) -> RollbackPoint:
    """Full check of a dump: size, sha256, and that pg_restore can read its table of contents;
    of a snapshot: its database exists and still holds the recorded tables and rows."""
    if point.kind == catalog.SNAPSHOT:
        if info is None:
            raise UsageError("checking a snapshot needs STAGING_DATABASE_URL (its database lives there)")
        snapshot.verify(info, point)
        point.status, point.problem = catalog.OK, ""
        return point
    progress = Progress("checking sha256", unit="")
    try:
        catalog.verify_checksum(point, on_progress=lambda done: progress.bytes(done, point.size_bytes))
    finally:
        progress.done()
    if point.kind == catalog.DUMP:
        pg_restore = restore_tool(point, archive_tool_major(point.tool_version), pg_bin_dir)
        try:
            entries = list_archive(pg_restore, str(point.path))
        except ToolFailed as exc:
            point.status, point.problem = catalog.CORRUPT, f"pg_restore cannot read it: {exc}"
            raise BackupCorrupt(f"rollback point {point.id} is CORRUPT: {point.problem}. Nothing was changed.") from None
        get_logger().debug("%s: %d archive entries readable by %s", point.id, entries, pg_restore.describe())
    point.status, point.problem = catalog.OK, ""
    return point


def restore_tool(point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str]) -> Tool:
    """pg_restore of the target server's major, never older than the pg_dump that wrote the archive
    (pg_restore 15 cannot read pg_dump 18's archive: 'unsupported version (1.16) in file header')."""
    archive_major = archive_tool_major(point.tool_version)
    return find_tool("pg_restore", server_major, pg_bin_dir, minimum=archive_major,
                     purpose=f"an archive written by pg_dump {point.tool_version} into PostgreSQL {server_major}")


def archive_extensions(tool: Tool, point: RollbackPoint) -> List[str]:
    """The extensions a dump creates, from its table of contents (read before anything changes)."""
    try:
        toc = run([tool.path, "--list", str(point.path)], what=f"pg_restore {tool.version} --list").stdout
    except ToolFailed as exc:
        raise BackupCorrupt(f"rollback point {point.id} is CORRUPT: pg_restore cannot read it ({exc}). "
                            "The target was not touched.") from None
    return dbprops.extensions_in_archive(toc)


def verify_checksum_with_progress(point: RollbackPoint) -> None:
    log = get_logger()
    log.info("Checking rollback point %s (sha256 of %s) ...", point.id, human_size(point.size_bytes))
    progress = Progress("checking sha256", unit="")
    try:
        catalog.verify_checksum(point, on_progress=lambda done: progress.bytes(done, point.size_bytes))
    finally:
        progress.done()


class ChecksumBeside:
    """`with ChecksumBeside(point):` hashes the dump in a thread; on exit, a mismatch raises
    BackupCorrupt, which also explains a pg_restore that failed on the damaged file."""

    def __init__(self, point: RollbackPoint):
        self.point = point
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            catalog.verify_checksum(self.point)
        except BaseException as exc:  # reported in the calling thread
            self.error = exc

    def __enter__(self) -> "ChecksumBeside":
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        get_logger().info("  checksum verified: sha256 matches the sidecar")


# Settings a newer pg_restore sets on its connection that an older server does not know: pg_restore
# 17+ sends `SET transaction_timeout = 0`, which PostgreSQL 15 and 16 refuse ("unrecognized
# configuration parameter"). Such a restore goes through pg_restore's script, without these lines, into psql.
_NEWER_SETTINGS = {17: ("transaction_timeout",)}


def unknown_settings(tool_major: int, server_major: int) -> tuple:
    return tuple(name for major, names in _NEWER_SETTINGS.items() if tool_major >= major > server_major for name in names)


def restorer(point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str]) -> str:
    """How this machine restores the point into a server of that major ('' for a snapshot), or a
    ToolNotFound saying why it cannot: a point is OK only when something here can restore it."""
    if point.kind != catalog.DUMP:
        return ""
    tool = restore_tool(point, server_major, pg_bin_dir)
    if unknown_settings(tool.major, server_major):
        psql = find_tool("psql", server_major, pg_bin_dir)
        return f"{tool.describe()} through {psql.describe()}"
    return tool.describe()


def fill_database(target: ConnInfo, point: RollbackPoint, server_major: int, pg_bin_dir: Optional[str],
                  tool: Optional[Tool] = None) -> None:
    """pg_restore the dump into an empty database (parallel jobs: the custom format allows it); a
    pg_restore newer than the server goes through its script into psql (see _NEWER_SETTINGS)."""
    tool = tool or restore_tool(point, server_major, pg_bin_dir)
    if unknown_settings(tool.major, server_major):
        _fill_through_psql(target, point, tool, find_tool("psql", server_major, pg_bin_dir), server_major)
        return
    jobs = max(2, min(4, os.cpu_count() or 2))
    progress = Progress("restoring", total=len(point.tables))

    def on_line(line: str) -> None:
        if "processing data for table" in line:
            progress.step(line.split("table", 1)[1].strip())

    get_logger().info("  %s, %d jobs, from %s", tool.describe(), jobs, point.path)
    argv = [tool.path, "--exit-on-error", "--verbose", f"--jobs={jobs}", "--no-password",
            "--dbname", conninfo_dbname(target.dbname), str(point.path)]
    try:
        run(argv, password=target.password, env=target.libpq_env(), on_stderr_line=on_line,
            what=f"pg_restore {tool.version}")
    except ToolFailed as exc:
        raise RestoreFailed(f"{exc}. The target was not touched.") from None
    finally:
        progress.done()


def _fill_through_psql(target: ConnInfo, point: RollbackPoint, tool: Tool, psql: Tool, server_major: int) -> None:
    """pg_restore --file=- | (without the SETs the server does not know) | psql, one stream."""
    get_logger().info("  %s through %s (pg_restore %d sets what PostgreSQL %d does not know: %s)", tool.describe(),
                      psql.describe(), tool.major, server_major, ", ".join(unknown_settings(tool.major, server_major)))
    producer = Process([tool.path, "--file=-", str(point.path)], env=target.libpq_env())
    try:
        with without_settings(producer, unknown_settings(tool.major, server_major)) as source:
            run([psql.path, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password", "--dbname",
                 conninfo_dbname(target.dbname)], password=target.password, env=target.libpq_env(), stdin=source,
                what=f"psql {psql.version} (restore of pg_restore {tool.version}'s script)")
        producer.wait(what=f"pg_restore {tool.version}")
    except ToolFailed as exc:
        producer.kill()
        raise RestoreFailed(f"{exc}. The target was not touched.") from None


@contextmanager
def without_settings(producer: Process, names: tuple):
    """A readable file of the producer's stdout without its `SET <name> ...` lines (none: as it is)."""
    if not names:
        yield producer.proc.stdout
        return
    drop = re.compile(rb"^SET (" + b"|".join(re.escape(n.encode()) for n in names) + rb") ")
    read_fd, write_fd = os.pipe()

    def relay() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink:
                for line in producer.proc.stdout:
                    if not drop.match(line):
                        sink.write(line)
        except OSError:
            pass  # the reader went away: its own error says why

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb") as source:
        yield source
    thread.join(timeout=5)


def conninfo_dbname(name: str) -> str:
    """A libpq conninfo naming only the database: safe for any name, even one with '=' or quotes."""
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{escaped}'"
