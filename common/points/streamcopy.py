"""reset_staging's copy of V2: streamed from pg_dump into pg_restore, with no dump file between.

A dump file is the right vehicle for a rollback point, which must be kept and checked later. A
reset keeps nothing, so writing 1 GB to disk and reading it back is two passes where one will do
(measured on 1.1 GB, PostgreSQL 15, 2 cores: dump to a file then pg_restore -j 2, 29.3 s; streamed
in two parallel streams, then indexes with two jobs, 18.8-19.0 s; pgcopydb clone 19.2-19.7 s).

Every pg_dump here imports the snapshot V2's Source exported, so all of them, and the row counts
the copy is checked against, see the same instant of V2:

  1. pre-data (types, tables, functions ...)      pg_dump --section=pre-data  | pg_restore
  2. data, in `jobs` parallel streams; the biggest  pg_dump --section=data -t ...  | pg_restore
     tables are spread over streams 2..n, stream 1 pg_dump --section=data --exclude-table-data ...
     carries everything else (sequences, large objects, the other tables)
  3. post-data (indexes, constraints, triggers,   pg_dump --section=post-data -f small file,
     materialized view contents), in parallel     pg_restore --jobs
The new database is checked like any restore, by exact row counts against V2's (in its snapshot),
before the swap; a failure at any step leaves staging untouched. Each table is counted as soon as
its stream has moved past it (post-data adds no rows), on one connection beside the streams and the
index builds, not in a pass after them; one ANALYZE follows post-data (expression indexes and
extended statistics exist only then)."""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Dict, List, Optional

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
        self.target_counts: Optional[Dict[str, int]] = None  # the new database's, once filled

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
        return cls(source, pg_dump, pg_restore, scratch, jobs or max(2, min(4, os.cpu_count() or 2)))

    def describe(self) -> str:
        return (f"streamed from V2 ({self.pg_dump.describe()} | {self.pg_restore.describe()}, "
                f"{self.jobs} data streams, no file in between)")

    def fill(self, target: ConnInfo) -> Dict[str, int]:
        """Copy V2 into `target` (empty); returns V2's exact row counts in the same snapshot."""
        log = get_logger()
        groups = self.split_tables()
        log.info("  %s", self.describe())
        counter = threading.Thread(target=self._count, daemon=True)  # V2's exact counts, in the dump's snapshot
        counter.start()
        progress = Progress("copying", total=len(self.source.tables))
        post = self.scratch / f"post-data-{os.getpid()}.dump"
        try:
            self._pipe(["--section=pre-data"], target, "pre-data")
            run(self._dump_argv(["--section=post-data", "--file", str(post)]), password=self.source.info.password,
                env=self.source.info.libpq_env(), what=f"pg_dump {self.pg_dump.version} (post-data)")
            tables = TableCounter(target)
            streams = [["--section=data"] + [f"--exclude-table-data={_pattern(t)}" for g in groups for t in g]]
            streams += [["--section=data", "--strict-names"] + [f"--table={_pattern(t)}" for t in g] for g in groups]
            try:
                self._parallel(streams, target, progress, tables)
                progress.done()
                log.info("  indexes, constraints and the rest, %d jobs (tables counted beside them) ...", self.jobs)
                run([self.pg_restore.path, "--exit-on-error", "--no-password", f"--jobs={self.jobs}",
                     "--dbname", conninfo_dbname(target.dbname), str(post)], password=target.password,
                    env=target.libpq_env(), what=f"pg_restore {self.pg_restore.version} (post-data)")
            except BaseException:
                tables.stop()
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
        counter.join()
        if self._count_error is not None:
            raise self._count_error
        return self.source.counts()

    def _count(self) -> None:
        try:
            self.source.counts()
        except BaseException as exc:  # reported in the calling thread
            self._count_error = exc

    def split_tables(self) -> List[List[str]]:
        """The tables that streams 2..n carry (stream 1 carries the rest): biggest first, each to
        the lightest stream. Tables of extensions stay in stream 1: pg_dump dumps their data only
        with their extension, which a --table selection leaves out."""
        sizes = rows(self.source.conn, """
            SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                   c.relpages::bigint + coalesce(t.relpages, 0)::bigint
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
            WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%%'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = c.oid AND d.deptype = 'e')
            ORDER BY 2 DESC, 1 LIMIT %s""", (MAX_MOVED_TABLES * self.jobs,))
        loads = [0] * self.jobs
        groups: List[List[str]] = [[] for _ in range(self.jobs)]
        for name, pages in sizes:
            lightest = loads.index(min(loads))
            if lightest and len(groups[lightest]) >= MAX_MOVED_TABLES:
                lightest = 0
            groups[lightest].append(name)
            loads[lightest] += max(int(pages), 1)
        return [g for g in groups[1:] if g]

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

    def _parallel(self, streams: List[List[str]], target: ConnInfo, progress: Progress, tables: "TableCounter") -> None:
        lock = threading.Lock()
        current: Dict[int, str] = {}

        def watcher(stream: int):
            def on_line(line: str) -> None:
                if "processing data for table" in line:
                    name = line.split("table", 1)[1].strip()
                    with lock:
                        progress.step(name)
                        if stream in current:  # the stream has moved past its previous table
                            tables.loaded(current[stream])
                        current[stream] = name
            return on_line

        started = [self._start(args, target, f"data stream {i + 1}", watcher(i)) for i, args in enumerate(streams)]
        try:
            for i, (producer, consumer, what) in enumerate(started):
                self._finish(producer, consumer, what)
                with lock:
                    if i in current:
                        tables.loaded(current.pop(i))
        finally:
            for producer, consumer, _ in started:  # one stream failed: stop the others at once
                consumer.kill()
                producer.kill()


class TableCounter:
    """Counts each table of the new database once its data is loaded, in a thread on a connection
    of its own; `finish()` counts what was not reached that way, analyses the database (after
    post-data), and returns every table's exact row count. Tables are named as pg_restore --verbose names them
    ("schema.table" in one pair of quotes); a name that matches no table, or two, is left to finish()."""

    def __init__(self, target: ConnInfo):
        self.conn = db.connect(target)
        self.by_label: Dict[str, list] = {}
        for schema, table in db.user_tables(self.conn):
            self.by_label.setdefault(f'"{schema}.{table}"', []).append((schema, table))
        self.counts: Dict[str, int] = {}
        self.jobs: "queue.Queue" = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def loaded(self, label: str) -> None:
        found = self.by_label.get(label, [])
        if len(found) == 1:
            self.jobs.put(found[0])

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                self._count(*job)
            except BaseException as exc:  # re-raised by finish()
                self.error = exc

    def _count(self, schema: str, table: str) -> None:
        name = f"{schema}.{table}"
        if name in self.counts:
            return
        self.counts[name] = db.table_count(self.conn, schema, table)

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
            db.execute(self.conn, "ANALYZE")  # pg_restore leaves no planner statistics
            return dict(sorted(self.counts.items()))
        finally:
            self.conn.close()


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
