"""Restore in place, for a role that may not create databases (DESIGN §5): pg_restore --clean in one
transaction, so a failure rolls back whole; relations, schemas and extensions added since the point
are dropped in that same transaction."""
from __future__ import annotations

import os
import time
from typing import Optional

from psycopg2 import sql

from .. import trust
from ..errors import RestoreFailed, ToolFailed
from ..log import get_logger
from ..pg import database as db
from ..pg import dbprops
from ..pg.database import ConnInfo
from ..pg.pgtools import Tool, find_tool
from ..runner import Process, run
from .catalog import RollbackPoint
from .check import compare_with_point
from .fill import restore_tool, unknown_settings, without_settings
from .plan import Plan, Result


def restore_in_place(the_plan: Plan, conn, pg_bin_dir: Optional[str]) -> Result:
    """For a role that may not create databases: pg_restore --clean in one transaction, so a failure
    rolls back whole. Relations and schemas added since the point are dropped in that transaction."""
    log = get_logger()
    info, point = the_plan.info, the_plan.point
    result = Result(info.dbname, point, method="in place, in one transaction (the role may not create databases)")
    log.warning("This role may not create databases: restoring %s in place, in one transaction.", info.dbname)
    tool = restore_tool(point, the_plan.server_major, pg_bin_dir)
    psql = find_tool("psql", the_plan.server_major, pg_bin_dir)
    found = db.sessions(conn, info.dbname)
    if found:
        log.info("Cutting %d connection(s) to %s:", len(found), info.dbname)
        db.log_sessions(found)
    result.sessions_cut, refused = db.terminate_sessions(conn, info.dbname)
    if refused:
        log.warning("this role may not cut %d session(s); the restore waits for their locks: %s", len(refused),
                    "; ".join(s.describe() for s in refused))
    preamble = extra_objects_sql(info, tool, point) + _property_sql(conn, the_plan)
    cut_at = time.monotonic()
    producer = Process([tool.path, "--clean", "--if-exists", "--file=-", str(point.path)], env=info.libpq_env())
    unknown = unknown_settings(tool.major, the_plan.server_major)
    preamble_file = point.folder / f".inplace_{os.getpid()}.sql"
    with trust.create_file(preamble_file) as fh:
        fh.write(preamble)
    try:
        with without_settings(producer, unknown) as source:
            run([psql.path, "-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1", "--no-password",
                 "-f", str(preamble_file), "-f", "-"], password=info.password, env=info.libpq_env(),
                stdin=source, what=f"psql {psql.version} (in-place restore)")
        producer.wait(what=f"pg_restore {tool.version}")
    except ToolFailed as exc:
        producer.kill()
        raise RestoreFailed(f"{exc}. The transaction was rolled back: {info.dbname} is unchanged.") from None
    finally:
        preamble_file.unlink()
    result.unavailable_seconds = time.monotonic() - cut_at
    result.notes.append("in place: the database was locked for the whole restore")
    result.tables_checked, result.rows_checked, result.objects_checked = _check_after_in_place(info, point)
    result.proof = "fingerprint" if result.objects_checked else "counts"
    return result


def _property_sql(conn, the_plan: Plan) -> str:
    """The statements that give the target its recorded properties, for the restore's transaction."""
    if the_plan.wanted_props is None or the_plan.current_props is None:
        return ""
    todo = dbprops.statements(the_plan.info.dbname, the_plan.current_props, the_plan.wanted_props)
    return "".join(s.query.as_string(conn) + ";\n" for s in todo)


def _check_after_in_place(info: ConnInfo, point: RollbackPoint) -> tuple:
    problems, checked = compare_with_point(info, point)
    if problems:
        raise RestoreFailed(f"{info.dbname} was restored in place but differs from the rollback point in "
                            f"{len(problems)} place(s) (" + "; ".join(problems[:5]) + "). Check it before use.")
    return checked


def extra_objects_sql(info: ConnInfo, tool: Tool, point: RollbackPoint) -> str:
    """DROP statements for schemas, relations and large objects the target has and the archive does not."""
    toc = run([tool.path, "--list", str(point.path)], what="pg_restore --list").stdout
    in_archive = set()
    for line in toc.splitlines():
        parts = line.split()
        if line.startswith(";") or len(parts) < 7:
            continue
        # e.g. "215; 1259 16390 TABLE public customers postgres", "5; 2615 16385 SCHEMA - sales postgres"
        kind, rest = parts[3], parts[4:]
        if kind == "MATERIALIZED" and rest[0] == "VIEW":
            kind, rest = "VIEW", rest[1:]
        if kind == "SCHEMA":
            in_archive.add(("SCHEMA", rest[1], ""))
        elif kind == "EXTENSION":  # e.g. "12; 3079 16400 EXTENSION - citext"
            in_archive.add(("EXTENSION", rest[1], ""))
        elif kind in ("TABLE", "VIEW", "SEQUENCE") and rest[0] not in ("DATA", "SET", "OWNED"):
            in_archive.add(("REL", rest[0], rest[1]))
    conn = db.connect(info)
    try:
        statements = []
        schemas = db.rows(conn, """SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'
                                   AND nspname NOT IN ('information_schema', 'public')""")
        gone = set()
        # Extensions made since the point: --clean leaves them (the archive does not name them).
        for (name,) in db.rows(conn, "SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'"):
            if ("EXTENSION", name, "") not in in_archive:
                statements.append(sql.SQL("DROP EXTENSION IF EXISTS {} CASCADE;").format(sql.Identifier(name)))
        for (schema,) in schemas:
            if ("SCHEMA", schema, "") not in in_archive:
                gone.add(schema)
                statements.append(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE;").format(sql.Identifier(schema)))
        # Partitioned tables go first, whole: --clean would drop each partition's inherited primary
        # key on its own, which fails ("cannot drop inherited constraint"); its IF EXISTS drops
        # then find nothing, and the archive creates them again.
        for schema, name in db.rows(conn, """
                SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind = 'p' AND NOT c.relispartition AND n.nspname NOT LIKE 'pg\\_%'"""):
            if schema not in gone:
                statements.append(sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE;").format(
                    sql.Identifier(schema), sql.Identifier(name)))
        relations = db.rows(conn, """
            SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'v', 'm', 'S', 'p', 'f') AND n.nspname NOT LIKE 'pg\\_%'
              AND n.nspname <> 'information_schema'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i', 'e'))""")
        kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE", "f": "FOREIGN TABLE"}
        for schema, name, kind in relations:
            if schema not in gone and ("REL", schema, name) not in in_archive:
                statements.append(sql.SQL("DROP {} IF EXISTS {}.{} CASCADE;").format(
                    sql.SQL(kinds[kind]), sql.Identifier(schema), sql.Identifier(name)))
        # Large objects made since the point are not in the archive, and --clean only unlinks those
        # that are: unlink them all (the archive makes its own again, with their OIDs).
        statements.append(sql.SQL("SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;"))
        return "\n".join(s.as_string(conn) for s in statements) + "\n"
    finally:
        conn.close()
