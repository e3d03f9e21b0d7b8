"""database_rollback.py verify: the health of a database and its drift from the newest rollback point."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..pg import database as db
from ..pg import frameworks
from ..pg.database import ConnInfo
from ..progress import human_size
from . import fingerprint
from .catalog import RollbackPoint
from .check import diff_counts, fingerprint_of

LONG_TRANSACTION_MINUTES = 10


@dataclass
class HealthReport:
    database: str
    server_version: str = ""
    size_bytes: int = 0
    tables: Dict[str, int] = field(default_factory=dict)
    migration_head: Optional[str] = None
    migration_heads: Dict[str, str] = field(default_factory=dict)  # every framework's (common.pg.frameworks)
    point: Optional[str] = None
    reference: str = ""  # why that point: the one restored from, the newest, or --file
    compared: str = ""  # what was compared: content and schema, or row counts only
    drift: List[str] = field(default_factory=list)
    blocked: List[str] = field(default_factory=list)
    long_transactions: List[str] = field(default_factory=list)
    invalid_indexes: List[str] = field(default_factory=list)
    connections_allowed: bool = True
    code_out_of_step: List[str] = field(default_factory=list)  # the code at REPO_PATH against the migrations

    def problems(self, strict: bool = False) -> List[str]:
        found = [f"blocked: {b}" for b in self.blocked]
        found += [f"long transaction: {t}" for t in self.long_transactions]
        found += [f"invalid index: {i}" for i in self.invalid_indexes]
        if not self.connections_allowed:
            found.append("the database does not allow connections (ALLOW_CONNECTIONS false)")
        if strict:
            found += [f"drift: {d}" for d in self.drift]
            found += [f"code: {d}" for d in self.code_out_of_step[:-1]]  # the last line says what to run
        return found

    def lines(self, strict: bool = False) -> List[str]:
        out = [f"database:       {self.database} (PostgreSQL {self.server_version}, {human_size(self.size_bytes)})",
               f"tables:         {len(self.tables)} ({sum(self.tables.values())} rows)",
               f"migration head: {frameworks.describe(self.migration_heads)}"]
        if self.point is None:
            out.append(f"drift:          not compared: {self.reference or 'no OK rollback point of this database'}")
        else:
            out.append(f"compared with:  rollback point {self.point} ({self.reference}); {self.compared}")
            if self.drift:
                out.append(f"drift:          {len(self.drift)} difference(s)")
                out += [f"  {d}" for d in self.drift]
            else:
                out.append(f"drift:          none: {self.compared} identical to rollback point {self.point}")
        out += [f"code:           {line}" for line in self.code_out_of_step]
        problems = self.problems(strict)
        out.append("problems:       " + ("none" if not problems else str(len(problems))))
        out += [f"  {p}" for p in problems]
        return out

    def to_json(self, strict: bool = False) -> dict:
        return {"database": self.database, "server_version": self.server_version, "size_bytes": self.size_bytes,
                "tables": self.tables, "migration_head": self.migration_head,
                "migration_heads": self.migration_heads, "compared_with": self.point,
                "reference": self.reference, "compared": self.compared,
                "drift": self.drift, "blocked": self.blocked, "long_transactions": self.long_transactions,
                "invalid_indexes": self.invalid_indexes, "connections_allowed": self.connections_allowed,
                "code_out_of_step": self.code_out_of_step,
                "problems": self.problems(strict), "ok": not self.problems(strict)}


def check(info: ConnInfo, point: Optional[RollbackPoint], reference: str = "", quick: bool = False) -> HealthReport:
    """Health of the database, and its drift from `point` (the one it was restored from, as the
    caller chose it and says in `reference`): content and schema by fingerprint, or with quick (or
    a point made before fingerprints) tables and row counts."""
    report = HealthReport(info.dbname, reference=reference)
    conn = db.connect(info)
    try:
        _, report.server_version = db.server_version(conn)
        report.size_bytes = db.database_size(conn, info.dbname)
        content = point is not None and not quick and point.fingerprint
        if not content:  # with a fingerprint, its own scan counts the rows
            report.tables = db.table_row_counts(conn)
        report.migration_head = db.migration_head(conn)
        report.migration_heads = frameworks.heads(conn)
        report.connections_allowed = bool(db.allows_connections(conn, info.dbname))
        report.blocked = [f"pid {pid} waits for a lock held by {blockers}: {query}" for pid, blockers, query in db.rows(conn, """
            SELECT pid, pg_blocking_pids(pid)::text, left(regexp_replace(query, '\\s+', ' ', 'g'), 80)
            FROM pg_stat_activity WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0""")]
        report.long_transactions = [f"pid {pid} {user} open for {age}: {query}" for pid, user, age, query in db.rows(conn, """
            SELECT pid, usename, date_trunc('second', now() - xact_start)::text,
                   left(regexp_replace(query, '\\s+', ' ', 'g'), 80)
            FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND xact_start < now() - make_interval(mins => %s)""", (LONG_TRANSACTION_MINUTES,))]
        report.invalid_indexes = [f"{schema}.{name}" for schema, name in db.rows(conn, """
            SELECT n.nspname, c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid""")]
    finally:
        conn.close()
    if point is not None:
        report.point = point.id
        if quick or not point.fingerprint:
            report.compared = "tables and row counts only" + (" (--quick)" if quick else
                                                              " (this point records no fingerprint)")
            report.drift = diff_counts(point.tables, report.tables)
        else:
            report.compared = "content and schema (row hashes, definitions, sequences, large objects)"
            current = fingerprint_of(info, like=point.fingerprint)
            report.tables = fingerprint.counts(current)
            report.drift = fingerprint.differences(point.fingerprint, current)
        if point.migration_heads is not None:  # every framework's head, recorded with the point
            for name in sorted(set(point.migration_heads) | set(report.migration_heads)):
                now, then = report.migration_heads.get(name, "-"), point.migration_heads.get(name, "-")
                if now != then:
                    report.drift.append(f"{name} migration head is {now}, the rollback point's is {then}")
        elif point.migration_head != report.migration_head:
            report.drift.append(f"migration head is {report.migration_head or '-'}, the rollback point's is "
                                f"{point.migration_head or '-'}")
    return report
