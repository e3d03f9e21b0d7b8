"""Making rollback points: the approaches of DESIGN §4, tried in order, every attempt logged."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .. import storage, trust
from ..errors import BackupFailed, ConfigError, NotConfirmed, RollbackError, ToolFailed, ToolNotFound, ToolVersionMismatch
from ..locks import DatabaseLock
from ..log import get_logger
from ..pg import dbprops, frameworks
from ..pg.database import ConnInfo, connect, migration_head, reason, rows, scalar, server_version, table_row_counts
from ..pg.pgtools import Tool, default_compression, find_tool
from ..progress import Progress, human_size
from ..runner import Process
from ..testing import testhooks
from . import catalog, fingerprint, marks, snapshot, warm
from .catalog import RollbackPoint

METHODS = ("pg_dump", "docker", "snapshot")
DUMP_METHODS = ("pg_dump", "docker")


@dataclass
class Source:
    """A database held open in one REPEATABLE READ transaction whose snapshot pg_dump imports,
    so the row counts and the dump describe the same instant even under concurrent writes."""

    info: ConnInfo
    conn: object
    major: int
    version: str
    snapshot_id: Optional[str]
    tables: List[str]
    data_bytes: int
    _counts: Optional[Dict[str, int]] = field(default=None, repr=False)
    fingerprint: Optional[dict] = field(default=None, repr=False)
    # False: counts() counts rows only (a copy checked by its row counts needs no hash of every row)
    with_fingerprint: bool = True

    @classmethod
    def open(cls, info: ConnInfo, app: str) -> "Source":
        conn = connect(info, autocommit=False, app=app)
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        major, version = server_version(conn)
        snapshot_id = None
        try:
            snapshot_id = scalar(conn, "SELECT pg_export_snapshot()")
        except Exception as exc:  # e.g. a hot standby before PostgreSQL 10
            conn.rollback()
            get_logger().warning("cannot export a snapshot (%s); row counts are taken separately", exc)
        tables = [f"{s}.{t}" for s, t in rows(conn, """
            SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%'""")]
        # From the planner's statistics, not pg_table_size(): that takes a lock per table and
        # would wait behind any exclusive lock before the dump has even started.
        data_bytes = int(scalar(conn, """
            SELECT coalesce(sum(c.relpages + coalesce(t.relpages, 0)), 0)::bigint
                   * current_setting('block_size')::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
            WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')""") or 0)
        return cls(info, conn, major, version, snapshot_id, tables, data_bytes)

    def counts(self) -> Dict[str, int]:
        """Row counts, and the fingerprint (content and schema) they come with, in the snapshot
        pg_dump imports; a fingerprint that cannot be taken leaves the counts alone."""
        if self._counts is None and not self.with_fingerprint:
            self._counts = table_row_counts(self.conn)
        if self._counts is None:
            try:
                self.conn.cursor().execute("SAVEPOINT fingerprint")
                self.fingerprint = fingerprint.take(self.conn)
                self._counts = fingerprint.counts(self.fingerprint)
                self.conn.cursor().execute("RELEASE SAVEPOINT fingerprint")
            except psycopg2.Error as exc:
                if isinstance(exc, psycopg2.errors.QueryCanceled):
                    raise  # cancelled because the dump failed: count_beside reports that
                if self.conn.closed or self.conn.get_transaction_status() not in (
                        psycopg2.extensions.TRANSACTION_STATUS_INERROR, psycopg2.extensions.TRANSACTION_STATUS_INTRANS):
                    raise
                self.conn.cursor().execute("ROLLBACK TO SAVEPOINT fingerprint")
                get_logger().warning("no fingerprint for this point (%s): it records row counts only", reason(exc))
                self.fingerprint = None
                self._counts = table_row_counts(self.conn)
        return self._counts

    def count_beside(self, proc: Process, what: str) -> None:
        """Count rows in our snapshot while the dump runs (two cores, both busy); if the dump fails,
        cancel the count, which would otherwise wait on the same locks pg_dump waited on."""
        failure: List[BaseException] = []

        def count() -> None:
            try:
                self.counts()
            except BaseException as exc:  # reported below, in the calling thread
                failure.append(exc)

        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        try:
            proc.wait(what=what)
        except BaseException:
            proc.kill()
            if counter.is_alive():
                self.conn.cancel()
            counter.join()
            self._abandon_snapshot()
            raise
        counter.join()
        if failure:
            raise failure[0]

    def _abandon_snapshot(self) -> None:
        """After a cancelled count the transaction is gone: start a fresh one for a next approach."""
        try:
            self.conn.rollback()
            self.snapshot_id = scalar(self.conn, "SELECT pg_export_snapshot()")
        except Exception:
            self.snapshot_id = None
        self._counts = None

    def close(self) -> None:
        if self.conn.closed:
            return
        try:
            self.conn.rollback()
        finally:
            self.conn.close()


def check_free_space(folder: Path, source: Source, compression: str) -> None:
    """Refuse early when the disk is clearly too small for the dump; warn when it is tight."""
    factor = 1.0 if compression in ("0", "none") else 0.5
    needed = int(source.data_bytes * factor)
    free = shutil.disk_usage(folder).free
    log = get_logger()
    log.debug("free space in %s: %s; estimated dump size: %s", folder, human_size(free), human_size(needed))
    if free < needed // 2:
        raise BackupFailed(f"not enough disk space in {folder}: {human_size(free)} free, the dump of "
                           f"{source.info.dbname} needs about {human_size(needed)}. Nothing was written. "
                           "Free space or set BACKUP_DIR to a larger disk.")
    if free < needed:
        log.warning("disk space is tight in %s: %s free, the dump may need about %s",
                    folder, human_size(free), human_size(needed))


def dump_to_file(source: Source, dest: Path, *, pg_bin_dir: Optional[str] = None,
                 method: Optional[str] = None, compress: Optional[str] = None) -> RollbackPoint:
    """Dump the source into `dest` (custom format) by the first approach that works; returns an
    unsaved point with size, sha256, counts and the method. Nothing is left behind on failure."""
    log = get_logger()
    methods = [method] if method else list(DUMP_METHODS)
    partial = dest.with_name(dest.name + ".partial")
    failures: List[str] = []
    errors: List[Exception] = []
    started = time.monotonic()
    for name in methods:
        log.info("Backup approach %s ...", name)
        try:
            tool_desc, tool_version, used_compress = _APPROACHES[name](source, partial, pg_bin_dir, compress)
        except (ToolNotFound, ToolFailed, BackupFailed) as exc:
            _remove(partial)
            log.debug("  approach %s failed: %s", name, exc)  # said once, in the error that lists them all
            failures.append(f"{name}: {exc}")
            errors.append(exc)
            if isinstance(exc, BackupFailed):
                break
            continue
        except BaseException:
            _remove(partial)
            raise
        counts = source.counts()
        storage.fsync_file(partial)
        os.chmod(partial, 0o600)
        size = partial.stat().st_size
        sha = catalog.sha256_file(partial)
        os.replace(partial, dest)
        storage.fsync_dir(dest.parent)
        return RollbackPoint(
            id=dest.stem, kind=catalog.DUMP, database=source.info.dbname,
            source_url=source.info.masked().replace(":***", ""), server_version=source.version,
            method=name, tool=tool_desc, tool_version=tool_version, compression=used_compress,
            file=dest.name, size_bytes=size, sha256=sha, tables=counts, fingerprint=source.fingerprint,
            migration_head=migration_head(source.conn), migration_heads=frameworks.heads(source.conn) or None,
            duration_seconds=round(time.monotonic() - started, 3), folder=dest.parent)
    error = BackupFailed("every backup approach failed; nothing was written:\n  " + "\n  ".join(failures))
    error.failures = failures
    error.no_tool = not failures or all(isinstance(e, (ToolNotFound, ToolVersionMismatch)) for e in errors)
    raise error


def _pg_dump(source: Source, partial: Path, pg_bin_dir: Optional[str], compress: Optional[str]):
    tool = find_tool("pg_dump", source.major, pg_bin_dir, purpose=f"PostgreSQL {source.major}")
    compression = compress or default_compression(tool)
    check_free_space(partial.parent, source, compression)
    argv = [tool.path, "--format=custom", f"--compress={compression}", "--file", str(partial),
            "--verbose", "--no-password"]
    if source.snapshot_id:
        argv += ["--snapshot", source.snapshot_id]
    progress = Progress("dumping", total=len(source.tables))

    def on_line(line: str) -> None:
        if "dumping contents of table" in line:
            size = partial.stat().st_size if partial.exists() else 0
            progress.step(line.split("table", 1)[1].strip(), f"{human_size(size)} written")

    log = get_logger()
    log.info("  %s, compression %s, into %s", tool.describe(), compression, partial.parent)
    trust.create_file(partial, binary=True).close()  # pg_dump then writes our own file, never through a link
    proc = Process(argv, password=source.info.password, env=source.info.libpq_env(), on_stderr_line=on_line)
    try:
        testhooks.checkpoint("backup-dump-started")
        source.count_beside(proc, what=f"pg_dump {tool.version}")
    except ToolFailed as exc:
        raise _explain(exc, tool, source) from None
    finally:
        proc.kill()
        progress.done()
    return tool.describe(), tool.version, compression


def _explain(exc: ToolFailed, tool: Tool, source: Source) -> ToolFailed:
    text = exc.stderr
    if "server version mismatch" in text:
        return ToolVersionMismatch(f"pg_dump {tool.version} cannot dump a PostgreSQL {source.version} server "
                                   f"(server version mismatch); it needs pg_dump {source.major} or newer",
                                   exc.returncode, text)
    if "No space left on device" in text or "File too large" in text or exc.returncode == -signal.SIGXFSZ:
        return ToolFailed(f"the disk is full, or a file size limit was reached (pg_dump: {exc}); the partial file "
                          "was removed", exc.returncode, text)
    return exc


def _docker(source: Source, partial: Path, pg_bin_dir: Optional[str], compress: Optional[str]):
    """pg_dump inside a postgres:<major> container, streamed into our file (DESIGN §4, approach 2)."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise ToolNotFound("the docker SDK is not installed (pip install docker)") from None
    try:
        client = docker.from_env(timeout=5)
        client.ping()
    except DockerException as exc:
        raise ToolNotFound(f"no Docker engine answers ({type(exc).__name__})") from None
    compression = compress or "0"
    check_free_space(partial.parent, source, compression)
    info = source.info
    if info.host.startswith("/"):
        raise ToolNotFound("the server is reached through a Unix socket, which a container cannot use")
    env = info.libpq_env()
    env["PGPASSWORD"] = info.password or ""
    command = ["pg_dump", "--format=custom", f"--compress={compression}", "--no-password"]
    if source.snapshot_id:
        command += ["--snapshot", source.snapshot_id]
    image = f"postgres:{source.major}"
    get_logger().info("  pg_dump in a %s container", image)
    try:
        container = client.containers.run(image, command, environment=env, network_mode="host", detach=True)
    except DockerException as exc:
        raise ToolNotFound(f"cannot start a {image} container: {exc}") from None
    try:
        with trust.create_file(partial, binary=True) as fh:
            for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
                fh.write(chunk)
        source.counts()
        code = container.wait().get("StatusCode", 1)
        if code != 0:
            stderr = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
            raise ToolFailed(f"pg_dump in {image} failed (exit {code}): {stderr.strip()[-300:]}", code, stderr)
        version = f"{source.major} (image {image})"
    finally:
        container.remove(force=True)
    return f"pg_dump in container {image}", version, compression


_APPROACHES = {"pg_dump": _pg_dump, "docker": _docker}


def create_point(info: ConnInfo, folder: Path, script: str, description: str = "", *,
                 pg_bin_dir: Optional[str] = None, method: Optional[str] = None,
                 compress: Optional[str] = None, lock: Optional[DatabaseLock] = None,
                 warm_copies: int = 0, confirm=None, code_commit: Optional[str] = None) -> RollbackPoint:
    """A rollback point of one database: lock (unless the caller holds it), dump, sidecar last;
    then, with warm_copies > 0, its warm copy, keeping that many of the database's newest warm.
    code_commit: the commit at REPO_PATH, recorded with it (the code that expects this database)."""
    if method and method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    if lock is None:
        with DatabaseLock(info, info.dbname, script) as own:
            return create_point(info, folder, script, description, pg_bin_dir=pg_bin_dir, method=method,
                                compress=compress, lock=own, warm_copies=warm_copies, confirm=confirm,
                                code_commit=code_commit)
    if method == "snapshot":
        return _with_commit(snapshot.create_snapshot(info, folder, script, description, lock=lock, confirm=confirm),
                            code_commit)
    started = time.monotonic()
    storage.ensure_dir(folder)
    log = get_logger()
    remove_stale_partials(folder, info.dbname)
    warm.remove_orphans(lock.conn, folder, info.dbname)
    source = Source.open(info, app=f"rollback-toolkit/{script}")
    major = source.major
    try:
        log.info("Creating a rollback point of %s (PostgreSQL %s, %d tables)",
                 info.masked(), source.version, len(source.tables))
        point_id = catalog.new_id(folder, info.dbname, description)
        point = dump_to_file(source, folder / f"{point_id}.dump", pg_bin_dir=pg_bin_dir,
                             method=method, compress=compress)
        props = dbprops.read(source.conn, info.dbname)
        point.database_properties = props.to_json() if props else None
    except BackupFailed as exc:
        source.close()
        if method or not getattr(exc, "no_tool", False):
            # a dump that ran and failed (killed, disk full, lost connection) is reported, not hidden
            raise BackupFailed(f"{exc}\n{info.dbname} was not touched.") from None
        # DESIGN §4, approach 3: no dump tool can do the job, so copy the database on its own server.
        log.warning("Every dump approach failed; falling back to a server-side snapshot (approach 3).")
        try:
            return _with_commit(snapshot.create_snapshot(info, folder, script, description, lock=lock,
                                                         confirm=confirm), code_commit)
        except NotConfirmed:
            raise
        except RollbackError as snap_exc:
            tried = getattr(exc, "failures", [str(exc)]) + [f"snapshot: {snap_exc}"]
            raise BackupFailed(f"every backup approach failed; nothing was written and {info.dbname} was not "
                               "touched:\n  " + "\n  ".join(tried)) from None
    finally:
        if not source.conn.closed:
            source.close()
    point.description = description
    point.code_commit = code_commit
    point.created_at = storage.utc_now().isoformat(timespec="seconds")
    testhooks.checkpoint("backup-dump-written")
    try:
        catalog.save(point)
    except BaseException:
        _remove(point.path)
        raise
    point.timings = {"dump": point.duration_seconds}
    if warm_copies > 0:
        # The point is OK from here on; the warm copy only makes its rollback faster. A sidecar
        # names it only once it is sealed, so a kill in between leaves an orphan the next run drops.
        warm_started = time.monotonic()
        seal = warm.build(lock.conn, info, point, major, pg_bin_dir)
        point.timings["warm copy (restore, seal, check)"] = round(time.monotonic() - warm_started, 3)
        point.duration_seconds = round(time.monotonic() - started, 3)
        if seal is not None:
            warm.record(point, seal)
            catalog.save(point)
            marks.forget(folder, seal.database)  # the sidecar names it now
            testhooks.checkpoint("warm-recorded")
        warm.prune(lock.conn, folder, info.dbname, warm_copies)
        if seal is None:
            catalog.save(point)  # the duration now covers the attempt
        if point.restore_problem:
            catalog.save(point)
            raise BackupFailed(f"rollback point {point.id} was written, but it cannot be restored on this machine: "
                               f"{point.restore_problem}. It is listed UNRESTORABLE and no rollback will pick it; "
                               f"{info.dbname} was not touched.")
    return point


def _with_commit(point: RollbackPoint, code_commit: Optional[str]) -> RollbackPoint:
    if code_commit:
        point.code_commit = code_commit
        catalog.save(point)
    return point


def remove_stale_partials(folder: Path, database: str, quiet_seconds: int = 600) -> None:
    """Delete leftovers of killed backups of this database (we hold its lock; a file nobody has
    written to for 10 minutes is not being written)."""
    prefix = storage.slug(database) + "_"
    now = time.time()
    for leftover in folder.glob(f"{prefix}*.partial"):
        if leftover.is_symlink() or now - leftover.lstat().st_mtime > quiet_seconds:
            get_logger().info("Removing the leftover of an interrupted backup: %s", leftover.name)
            _remove(leftover)


def _remove(path: Optional[Path]) -> None:
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


