"""reset_staging's copy of V2: streamed from pg_dump into pg_restore, with no dump file between.

A dump file is the right vehicle for a rollback point, which must be kept and checked later. A
reset keeps nothing, so writing 1 GB to disk and reading it back is two passes where one will do
(measured on 1.1 GB, PostgreSQL 15, 2 cores: dump to a file then pg_restore -j 2, 29.3 s; streamed
in two parallel streams, then indexes with two jobs, 18.8-19.0 s; pgcopydb clone 19.2-19.7 s).

Every pg_dump here imports the snapshot V2's Source exported, so all of them, and the row counts
the copy is checked against, see the same instant of V2:

  1. pre-data (types, tables, functions ...)      pg_dump --section=pre-data  | pg_restore
  2. data: the biggest tables (up to 64 each)      COPY ... TO STDOUT on V2 -> COPY ... FROM STDIN
     spread over `jobs` COPY streams, each a pair    WITH (FREEZE), one table after another, in
     of connections; stream 1 carries the rest      the binary format where the column types allow
     (sequences, large objects, other tables)       pg_dump --section=data --exclude-table-data ...
                                                    | pg_restore
  3. post-data (indexes, constraints, triggers,   pg_dump --section=post-data -f small file (while
     materialized view contents): a COPY-streamed   pre-data is restored); pg_restore --jobs=2
     table's indexes and key constraints as soon    --use-list (that table's entries), one table at
     as it is loaded, the rest in parallel          a time, then pg_restore --jobs --use-list (the rest)
The new database is checked like any restore, by exact row counts against V2's in its snapshot
(a COPY-streamed table's: the rows V2's COPY sent; the others': counted beside the streams), before
the swap; a failure at any step leaves staging untouched. Each table's own rows are counted (ONLY:
an inheritance parent apart from its children). Each table is counted and analysed as soon as its
stream has moved past it (post-data adds no rows), on one connection beside the streams, not in a
pass after them; after post-data, only what it changed is analysed again (tables with expression
indexes or extended statistics, partitioned tables, inheritance parents, materialized views) with
whatever was not reached before.

The COPY streams copy table by table between two connections, as pgcopydb does, instead of through
pg_dump's archive format and pg_restore: each table is truncated and loaded in one transaction WITH
(FREEZE), so its rows are written once, already frozen and visible, and the index builds, counts and
ANALYZE that read them next do not write every page again to set hint bits (measured on two 270 MB
tables in parallel: 9.7 s through pg_dump | pg_restore, 7.5 s by COPY)."""
from __future__ import annotations

import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psycopg2
from psycopg2 import sql

from ..errors import RestoreFailed, ToolFailed, ToolNotFound
from ..log import get_logger
from ..pg import database as db
from ..pg.database import ConnInfo, rows
from ..pg.pgtools import Tool, find_tool
from ..progress import Progress
from ..runner import Process, run
from .backup import Source
from .fill import conninfo_dbname

# Tables moved out of the first stream are named one by one on pg_dump's command line, and pg_dump
# looks each name up with a query of its own: a bounded number keeps that cheap on a database of
# thousands of small tables, where the big ones are what matters for the balance anyway.
MAX_MOVED_TABLES = 64


class StreamedCopy:
    """`StreamedCopy.prepare(source, server_major, ...)` or None (with the reason logged) when a
    stream cannot be used; then `fill(target)` copies V2 into the empty database `target`."""

    def __init__(self, source: Source, pg_dump: Tool, pg_restore: Tool, scratch: Path, jobs: int):
        self.source, self.pg_dump, self.pg_restore = source, pg_dump, pg_restore
        self.scratch, self.jobs = scratch, jobs
        self._count_error: Optional[BaseException] = None
        self.source_counts: Dict[str, int] = {}  # V2's rows in the snapshot, table by table (ONLY)
        self.target_counts: Optional[Dict[str, int]] = None  # the new database's, once filled
        self.server_major: Optional[int] = None  # staging's server

    @classmethod
    def prepare(cls, source: Source, server_major: int, pg_bin_dir: Optional[str], scratch: Path,
                jobs: Optional[int] = None) -> Optional["StreamedCopy"]:
        log = get_logger()
        if not source.snapshot_id:
            log.info("V2 could not export a snapshot: dumping to a file first, then restoring it.")
            return None
        try:
            pg_dump = find_tool("pg_dump", source.major, pg_bin_dir, purpose=f"PostgreSQL {source.major}")
            pg_restore = find_tool("pg_restore", server_major, pg_bin_dir, minimum=pg_dump.major,
                                   purpose=f"pg_dump {pg_dump.version}'s output into PostgreSQL {server_major}")
        except ToolNotFound as exc:
            log.info("No local pg_dump/pg_restore pair to stream with (%s): dumping to a file first.", exc)
            return None
        copy = cls(source, pg_dump, pg_restore, scratch, jobs or max(2, min(4, os.cpu_count() or 2)))
        copy.server_major = server_major
        return copy

    def describe(self) -> str:
        formats = ("binary where their column types allow" if self.server_major == self.source.major else
                   "as text between two majors")
        return (f"streamed from V2 (the biggest tables by COPY between two connections, {formats}, the rest by "
                f"{self.pg_dump.describe()} | {self.pg_restore.describe()}; {self.jobs} data streams, no file in between)")

    def fill(self, target: ConnInfo) -> Dict[str, int]:
        """Copy V2 into `target` (empty); returns V2's exact row counts in the same snapshot, each
        table's own rows (inheritance children are counted as tables of their own)."""
        log = get_logger()
        groups = self.split_tables()
        log.info("  %s", self.describe())
        # V2's exact counts, in the dump's snapshot: a COPY-streamed table's are the rows V2's COPY
        # sent (a second scan of V2 to count them again cost CPU the copy needs), the other tables
        # are counted beside the streams. Only counts: the copy is checked by them, and hashing every
        # row of V2 beside the streams cost a third of this copy's time (measured).
        streamed = {(schema, table) for g in groups for _, schema, table in g}
        others = [(s, t) for s, t in db.user_tables(self.source.conn) if (s, t) not in streamed]
        if groups:  # as pg_dump does: no TRUNCATE or rewrite of a table on V2 until the copy is over
            # (neither is MVCC-safe: a COPY in the snapshot would read the table empty, and count it so)
            db.execute(self.source.conn, sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                sql.SQL(", ").join(sql.SQL(quoted) for g in groups for quoted, _, _ in g)))
        owners = _index_owners(self.source.conn, [(schema, table) for g in groups for _, schema, table in g])
        counter = threading.Thread(target=self._count, args=(others,), daemon=True)
        counter.start()
        progress = Progress("copying", total=len(self.source.tables))
        post = self.scratch / f"post-data-{os.getpid()}.dump"
        tables = early = None
        try:
            # post-data is dumped to its small file while pre-data is restored
            post_dump = Process(self._dump_argv(["--section=post-data", "--file", str(post)]),
                                password=self.source.info.password, env=self.source.info.libpq_env())
            try:
                self._pipe(["--section=pre-data"], target, "pre-data")
                post_dump.wait(what=f"pg_dump {self.pg_dump.version} (post-data)")
            finally:
                post_dump.kill()
            rest = ["--section=data"] + [f"--exclude-table-data={_pattern(t[0])}" for g in groups for t in g]
            try:
                tables = TableCounter(target)
                early = EarlyIndexes(self.pg_restore, post, target, owners)
                self._parallel(rest, groups, target, progress, tables, early)
                progress.done()
                left = early.finish()
                log.info("  indexes, constraints and the rest, %d jobs (tables counted beside them; %d indexes and "
                         "constraints built as their tables arrived) ...", self.jobs, early.built)
                run([self.pg_restore.path, "--exit-on-error", "--no-password", f"--jobs={self.jobs}",
                     "--use-list", str(left), "--dbname", conninfo_dbname(target.dbname), str(post)],
                    password=target.password, env=target.libpq_env(),
                    what=f"pg_restore {self.pg_restore.version} (post-data)")
            except BaseException:
                for started in (early, tables):
                    if started is not None:
                        started.stop()
                raise
            self.target_counts = tables.finish()
        except BaseException as exc:
            if counter.is_alive():  # the count would otherwise go on, on a connection about to close
                self.source.conn.cancel()
            counter.join()
            if isinstance(exc, ToolFailed):
                raise RestoreFailed(f"copying V2 failed: {exc}. Staging was not touched.") from None
            raise
        finally:
            progress.done()
            post.unlink(missing_ok=True)
            for listed in post.parent.glob(f"{post.name}.*.list"):
                listed.unlink(missing_ok=True)
        counter.join()
        if self._count_error is not None:
            raise self._count_error
        return dict(sorted(self.source_counts.items()))

    def _count(self, tables: List[tuple]) -> None:
        try:
            for schema, table in tables:
                self.source_counts[f"{schema}.{table}"] = db.table_count(self.source.conn, schema, table, only=True)
        except BaseException as exc:  # reported in the calling thread
            self._count_error = exc

    def split_tables(self) -> List[List[tuple]]:
        """The tables the COPY streams carry, as (quoted name, schema, name): the biggest first,
        each to the lightest of `jobs` streams, up to MAX_MOVED_TABLES each. Stream 1 (pg_dump)
        carries the rest, sequences and large objects, and tables of extensions: pg_dump dumps
        their data only with their extension."""
        sizes = rows(self.source.conn, """
            SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                   c.relpages::bigint + coalesce(t.relpages, 0)::bigint, n.nspname, c.relname
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
            WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%%'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = c.oid AND d.deptype = 'e')
            ORDER BY 2 DESC, 1 LIMIT %s""", (MAX_MOVED_TABLES * self.jobs,))
        loads = [0] * self.jobs
        groups: List[List[tuple]] = [[] for _ in range(self.jobs)]
        for name, pages, schema, table in sizes:
            lightest = min((i for i in range(self.jobs) if len(groups[i]) < MAX_MOVED_TABLES), key=loads.__getitem__)
            groups[lightest].append((name, schema, table))
            loads[lightest] += max(int(pages), 1)
        return [g for g in groups if g]

    def _dump_argv(self, extra: List[str]) -> List[str]:
        return [self.pg_dump.path, "--format=custom", "--compress=0", "--no-password",
                f"--snapshot={self.source.snapshot_id}", *extra]  # the database: PGDATABASE

    def _start(self, dump_args: List[str], target: ConnInfo, what: str, on_line=None) -> tuple:
        producer = Process(self._dump_argv(dump_args), password=self.source.info.password,
                           env=self.source.info.libpq_env())
        consumer = Process([self.pg_restore.path, "--exit-on-error", "--no-password", "--verbose",
                            "--dbname", conninfo_dbname(target.dbname)], password=target.password, env=target.libpq_env(),
                           stdin=producer.proc.stdout, on_stderr_line=on_line)
        # Only pg_restore reads the stream: if it stops, pg_dump gets a broken pipe instead of
        # filling a pipe nobody drains.
        producer.proc.stdout.close()
        producer.proc.stdout = None
        return producer, consumer, what

    def _finish(self, producer: Process, consumer: Process, what: str) -> None:
        try:
            consumer.wait(what=f"pg_restore {self.pg_restore.version} ({what})")
            producer.wait(what=f"pg_dump {self.pg_dump.version} ({what})")
        finally:
            consumer.kill()
            producer.kill()

    def _pipe(self, dump_args: List[str], target: ConnInfo, what: str) -> None:
        self._finish(*self._start(dump_args, target, what))

    def _parallel(self, rest: List[str], groups: List[List[tuple]], target: ConnInfo, progress: Progress,
                  tables: "TableCounter", early: "EarlyIndexes") -> None:
        """Stream 1 (pg_dump of everything but the groups' tables | pg_restore) and one COPY stream
        per group, all at once; the first failure stops every other stream."""
        lock = threading.Lock()
        current: Dict[int, str] = {}

        def on_line(line: str) -> None:
            if "processing data for table" in line:
                name = line.split("table", 1)[1].strip()
                with lock:
                    progress.step(name)
                    if 0 in current:  # the stream has moved past its previous table
                        tables.loaded(current[0])
                    current[0] = name

        copies = [TableCopies(self.source, target, group, progress, lock, tables, early, self.source_counts)
                  for group in groups]
        producer, consumer, what = self._start(rest, target, "data stream 1", on_line)
        try:
            for copy in copies:
                copy.start()
            self._finish(producer, consumer, what)
            with lock:
                if 0 in current:
                    tables.loaded(current.pop(0))
            for copy in copies:
                copy.join()
        finally:  # one stream failed: stop the others at once
            consumer.kill()
            producer.kill()
            for copy in copies:
                copy.stop()


# V2's side of a COPY stream reads as pg_dump reads: dates and intervals in a form any server parses,
# floats exact, and an error instead of rows silently left out by a row security policy.
_READ_SETTINGS = ("SET DateStyle = 'ISO'", "SET IntervalStyle = 'postgres'", "SET extra_float_digits = 3",
                  "SET row_security = off", "SET statement_timeout = 0", "SET lock_timeout = 0",
                  "SET idle_in_transaction_session_timeout = 0")
_WRITE_SETTINGS = ("SET row_security = off", "SET statement_timeout = 0", "SET lock_timeout = 0",
                   "SET xmloption = content")  # an xml value may be a fragment, as pg_restore allows


class TableCopies:
    """One data stream of the copy: the tables of `group`, one after another, each read by COPY TO
    STDOUT on V2 (in the dump's snapshot) and written by COPY FROM STDIN WITH (FREEZE) into the new
    database, in a transaction that truncates it first (which is what FREEZE requires). A thread of
    its own; `join()` re-raises its failure, `stop()` cancels it."""

    def __init__(self, source: Source, target: ConnInfo, group: List[tuple], progress: Progress,
                 lock: threading.Lock, tables: "TableCounter", early: "EarlyIndexes", sent: Dict[str, int]):
        self.source, self.target, self.group = source, target, group
        self.progress, self.lock, self.tables, self.early = progress, lock, tables, early
        self.sent = sent  # V2's rows of each table, as its COPY sent them
        self.error: Optional[BaseException] = None
        self.conns: List = []
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        while self.thread.is_alive():
            self.thread.join(0.2)  # a Ctrl-C in the main thread is not held up by the join
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stopped = True
        for conn in self.conns:
            try:
                conn.cancel()
            except Exception:  # already closed
                pass
        self.thread.join()

    def _run(self) -> None:
        try:
            reader = db.connect(self.source.info, app="rollback-toolkit/reset")
            self.conns.append(reader)
            writer = db.connect(self.target, app="rollback-toolkit/reset")
            self.conns.append(writer)
            db.execute(reader, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            db.execute(reader, "SET TRANSACTION SNAPSHOT %s", (self.source.snapshot_id,))
            encoding = db.scalar(reader, "SELECT pg_encoding_to_char(encoding) FROM pg_database "
                                         "WHERE datname = current_database()")
            for statement in _READ_SETTINGS + (("SET transaction_timeout = 0",) if self.source.major >= 17 else ()):
                db.execute(reader, statement)
            for statement in _WRITE_SETTINGS:
                db.execute(writer, statement)
            for conn in (reader, writer):  # the bytes pass through as V2 encoded them
                try:
                    conn.set_client_encoding(encoding)  # psycopg2 encodes the statements' names with it too
                except (psycopg2.Error, LookupError):
                    db.execute(conn, "SELECT set_config('client_encoding', %s, false)", (encoding,))
            same_major = _major(reader.server_version) == _major(writer.server_version)
            for quoted, schema, table in self.group:
                if self.stopped:
                    return
                with self.lock:
                    self.progress.step(f'"{schema}.{table}"')
                began = time.monotonic()
                columns, binary = self._columns(reader, quoted)
                binary = binary and same_major
                sent, taken = self._copy(reader, writer, quoted, columns, "binary" if binary else "text")
                get_logger().debug("copied %s.%s (%s): V2 sent %d rows, the new database took %d, in %.2f s", schema,
                                   table, "binary" if binary else "text", sent, taken, time.monotonic() - began)
                with self.lock:
                    self.sent[f"{schema}.{table}"] = sent
                self.tables.loaded_table(schema, table)
                self.early.loaded(schema, table)
        except psycopg2.Error as exc:
            self.error = RestoreFailed(f"copying V2 failed: {db.reason(exc)}. Staging was not touched.")
        except BaseException as exc:  # re-raised by join()
            self.error = exc
        finally:
            for conn in self.conns:
                conn.close()

    def _columns(self, reader, quoted: str) -> tuple:
        """The table's stored columns in order, as pg_dump lists them (generated columns are computed
        again by the new database; empty for a table without columns), and whether the table may be
        copied in COPY's binary format: when every column's type, under any domains, and an array's
        element type, is one of PostgreSQL's own (an OID below 10000, assigned in its source and the
        same on every server; initdb's later objects, such as information_schema's domains, get
        OIDs that vary) with binary send and receive functions, except
          - the reg* types (regclass, regtype, regconfig ...): their binary form is the raw OID of
            the object named, which is another object, or none, in the new database; as text they
            are names, looked up again;
          - xml: sent with an encoding declaration added when the client encoding is not UTF8.
        The binary form of a user-defined type carries OIDs that differ in the new database (arrays
        and composites do), or needs functions it may not have: those tables go as text.
        Binary spares both servers converting every value to text and parsing it back: measured on a
        290 MB table, COPY FROM 9.8-11.4 s as text, 8.3 s binary (COPY TO 1.5 s, 1.2 s)."""
        generated = "AND a.attgenerated = ''" if self.source.major >= 12 else ""
        names, binary = db.rows(reader, f"""
            WITH RECURSIVE base(col, oid) AS (
                SELECT a.attnum, a.atttypid FROM pg_attribute a
                WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped {generated}
                UNION ALL
                SELECT b.col, t.typbasetype FROM base b JOIN pg_type t ON t.oid = b.oid WHERE t.typtype = 'd')
            SELECT (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) FROM pg_attribute a
                    WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped {generated}),
                   coalesce(bool_and(t.oid < 10000 AND t.typsend <> 0 AND t.typreceive <> 0
                                     AND t.typname !~ '^(reg|xml$)'
                                     AND (t.typelem = 0 OR EXISTS (
                                          SELECT 1 FROM pg_type e WHERE e.oid = t.typelem AND e.oid < 10000
                                          AND e.typsend <> 0 AND e.typreceive <> 0
                                          AND e.typname !~ '^(reg|xml$)'))), false)
            FROM base b JOIN pg_type t ON t.oid = b.oid WHERE t.typtype <> 'd'""", (quoted, quoted))[0]
        return (f" ({names})" if names else ""), bool(binary)

    def _copy(self, reader, writer, quoted: str, columns: str, format: str) -> tuple:
        """Copy one table; returns the rows V2 sent and the rows the new database took (COPY's own
        counts: the server's, of rows it read in the snapshot and of rows it wrote)."""
        read_fd, write_fd = os.pipe()
        incoming, outgoing = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb", buffering=1 << 20)
        failure: List[BaseException] = []
        sent: List[int] = []

        def send() -> None:
            try:
                cursor = reader.cursor()
                cursor.copy_expert(f"COPY {quoted}{columns} TO STDOUT WITH (FORMAT {format})", outgoing)
                sent.append(cursor.rowcount)
            except BaseException as exc:  # the writer must not commit what it got: checked below
                failure.append(exc)
            finally:
                try:
                    outgoing.close()
                except OSError:  # the writer stopped reading first (its own failure is the one reported)
                    pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            db.execute(writer, "BEGIN")
            db.execute(writer, f"TRUNCATE ONLY {quoted}")
            cursor = writer.cursor()
            cursor.copy_expert(f"COPY {quoted}{columns} FROM STDIN WITH (FORMAT {format}, FREEZE)", incoming,
                               size=1 << 18)
            written = cursor.rowcount
            sender.join()
            if failure:
                raise failure[0]
            db.execute(writer, "COMMIT")
            return sent[0], written
        except BaseException:
            incoming.close()  # the sender's next write fails instead of waiting for a reader
            sender.join()
            raise
        finally:
            incoming.close()


def _major(server_version: int) -> int:
    """150018 -> 15; 90624 -> 906 (before PostgreSQL 10 a major had two parts)."""
    return server_version // 10000 if server_version >= 100000 else server_version // 100


def _index_owners(conn, tables: List[tuple]) -> Dict[int, tuple]:
    """V2's indexes and primary key, unique and exclusion constraints of `tables` (plain tables, not
    partitions), by OID: what post-data builds on one table alone, so it can be built as soon as
    that table is loaded."""
    if not tables:
        return {}
    found = rows(conn, """
        WITH t AS (SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.relkind = 'r' AND NOT c.relispartition
                     AND (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[])))
        SELECT i.indexrelid, t.nspname, t.relname FROM pg_index i JOIN t ON t.oid = i.indrelid
        UNION ALL
        SELECT k.oid, t.nspname, t.relname FROM pg_constraint k JOIN t ON t.oid = k.conrelid
        WHERE k.contype IN ('p', 'u', 'x')""", ([s for s, _ in tables], [t for _, t in tables]))
    return {int(oid): (schema, table) for oid, schema, table in found}


class EarlyIndexes:
    """Builds a table's indexes and key constraints from the post-data archive as soon as a COPY
    stream has loaded the table, one table at a time, while the other streams go on (pgcopydb does
    the same): the builds of the first tables overlap the copy of the last ones, and what is left
    for post-data is shorter. `finish()` waits for them and returns the list of what is left."""

    _ENTRY = re.compile(r"^(\d+); (\d+) (\d+) (INDEX|CONSTRAINT) (?!ATTACH )")

    def __init__(self, pg_restore: Tool, archive: Path, target: ConnInfo, owners: Dict[int, tuple]):
        self.pg_restore, self.archive, self.target = pg_restore, archive, target
        listing = run([pg_restore.path, "--list", str(archive)], what=f"pg_restore {pg_restore.version} (--list)").stdout
        self.lines = [line for line in listing.splitlines() if line.strip() and not line.startswith(";")]
        self.by_table: Dict[tuple, List[str]] = {}
        for line in self.lines:
            match = self._ENTRY.match(line)
            if match and int(match.group(3)) in owners:
                self.by_table.setdefault(owners[int(match.group(3))], []).append(line)
        self.done: set = set()
        self.built = 0
        self.error: Optional[BaseException] = None
        self.process: Optional[Process] = None
        self.stopped = self.closing = False
        self.jobs: "queue.Queue" = queue.Queue()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def loaded(self, schema: str, table: str) -> None:
        if (schema, table) in self.by_table:
            self.jobs.put((schema, table))

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.stopped or self.closing:
                return
            if self.error is not None:
                continue
            items = self.by_table[job]
            listed = self.archive.with_name(f"{self.archive.name}.{len(self.done)}.list")
            listed.write_text("\n".join(items) + "\n")
            try:
                # two jobs: a table's indexes side by side, so that the last tables' do not build one
                # after another on one core once the copy is over
                self.process = Process([self.pg_restore.path, "--exit-on-error", "--no-password", "--jobs=2",
                                        "--use-list",
                                        str(listed), "--dbname", conninfo_dbname(self.target.dbname), str(self.archive)],
                                       password=self.target.password, env=self.target.libpq_env())
                self.process.wait(what=f"pg_restore {self.pg_restore.version} (indexes of {job[0]}.{job[1]})")
                self.done.update(items)
                self.built += len(items)
            except BaseException as exc:  # re-raised by finish()
                self.error = exc
            finally:
                listed.unlink(missing_ok=True)

    def finish(self) -> Path:
        """Once every table is loaded: the build under way ends, the tables still waiting are left
        to post-data, which builds them in parallel."""
        self.closing = True
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        left = self.archive.with_name(f"{self.archive.name}.left.list")
        left.write_text("".join(line + "\n" for line in self.lines if line not in self.done))
        return left

    def stop(self) -> None:
        self.stopped = True
        self.jobs.put(None)
        if self.process is not None:
            self.process.kill()
        self.thread.join()


class TableCounter:
    """Counts and analyses each table of the new database once its data is loaded, in a thread on a
    connection of its own; `finish()` counts what was not reached that way, analyses what needs
    post-data or was not reached, and returns every table's exact row count (its own rows, ONLY: a
    parent's count must not depend on which of its children are loaded yet). Stream 1 names its
    tables as pg_restore --verbose does ("schema.table" in one pair of quotes); a name that matches
    no table, or two, is left to finish()."""

    def __init__(self, target: ConnInfo):
        self.conn = db.connect(target)
        self.by_label: Dict[str, list] = {}
        for schema, table in db.user_tables(self.conn):
            self.by_label.setdefault(f'"{schema}.{table}"', []).append((schema, table))
        self.counts: Dict[str, int] = {}
        self.analysed: List[tuple] = []
        self.jobs: "queue.Queue" = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def loaded(self, label: str) -> None:
        found = self.by_label.get(label, [])
        if len(found) == 1:
            self.jobs.put(found[0])

    def loaded_table(self, schema: str, table: str) -> None:
        self.jobs.put((schema, table))

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                self._count(*job)
                db.execute(self.conn, sql.SQL("ANALYZE {}.{}").format(sql.Identifier(job[0]), sql.Identifier(job[1])))
                self.analysed.append(job)
            except BaseException as exc:  # re-raised by finish()
                self.error = exc

    def _count(self, schema: str, table: str) -> None:
        name = f"{schema}.{table}"
        if name in self.counts:
            return
        self.counts[name] = db.table_count(self.conn, schema, table, only=True)

    def stop(self) -> None:
        """The copy failed: no more counting (a count under way is cancelled)."""
        self.error = self.error or RuntimeError("stopped")
        self.conn.cancel()
        self.jobs.put(None)
        self.thread.join()
        self.conn.close()

    def finish(self) -> Dict[str, int]:
        self.jobs.put(None)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            for schema, table in db.user_tables(self.conn):  # after post-data: every table there is
                self._count(schema, table)
            # pg_restore leaves no planner statistics. A table analysed as it was loaded needs it
            # again only for what post-data made: statistics of expression indexes and extended
            # statistics; partitioned tables, inheritance parents and materialized views now.
            for schema, name in db.rows(self.conn, _ANALYZE_AFTER_POST_DATA,
                                        ([s for s, _ in self.analysed], [t for _, t in self.analysed])):
                db.execute(self.conn, sql.SQL("ANALYZE {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
            return dict(sorted(self.counts.items()))
        finally:
            self.conn.close()


_ANALYZE_AFTER_POST_DATA = """
    SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\\_%%'
      AND ((n.nspname, c.relname) NOT IN (SELECT * FROM unnest(%s::text[], %s::text[]))
           OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indexprs IS NOT NULL)
           OR EXISTS (SELECT 1 FROM pg_statistic_ext x WHERE x.stxrelid = c.oid)
           OR EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhparent = c.oid))
    ORDER BY 1, 2"""


def _pattern(quoted_name: str) -> str:
    """A table for pg_dump's --table/--exclude-table-data, given as quote_ident(schema).quote_ident(name):
    inside double quotes a pattern's special characters (* ? . and regular expression ones) are
    literal, and quote_ident already doubles embedded quotes. quote_ident leaves plain lower-case
    names bare, so they are quoted here too (a bare name would still be a pattern)."""
    schema, _, name = _split_qualified(quoted_name)
    return f"{_quoted(schema)}.{_quoted(name)}"


def _split_qualified(text: str) -> tuple:
    """Split quote_ident(a).quote_ident(b) at the dot that is outside quotes."""
    inside = False
    for i, ch in enumerate(text):
        if ch == '"':
            inside = not inside
        elif ch == "." and not inside:
            return text[:i], ".", text[i + 1:]
    raise ValueError(f"not a qualified name: {text!r}")


def _quoted(ident: str) -> str:
    return ident if ident.startswith('"') else f'"{ident}"'
