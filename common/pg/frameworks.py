"""Where the application's own migrations stand (DESIGN §7, "The application's migrations"): the
tracking tables of Django, Alembic, Flyway, Rails, Prisma, Liquibase and golang-migrate, read-only,
beside the toolkit's own `schema_migrations`.

Rails' and golang-migrate's tables are also named `schema_migrations`; they are told apart from
the toolkit's by their columns: (version) for Rails, (version, dirty) for golang-migrate, and
(version, name, checksum, applied_at) for the toolkit."""
from __future__ import annotations

from typing import Dict, List, Optional, Set

from psycopg2 import sql

from . import database as db

TOOLKIT = "toolkit"

# framework -> the command that moves its migrations (named when the toolkit's own refuse)
COMMANDS = {
    "django": "python manage.py migrate <app> <migration>",
    "alembic": "alembic downgrade <revision> / alembic upgrade head",
    "flyway": "flyway undo / flyway migrate",
    "rails": "bin/rails db:rollback / bin/rails db:migrate",
    "prisma": "npx prisma migrate resolve / npx prisma migrate deploy",
    "liquibase": "liquibase rollback-count <n> / liquibase update",
    "golang-migrate": "migrate -path <dir> -database <url> down 1 / up",
}


def _table(conn, name: str) -> Optional[tuple]:
    """(schema, table, its column names) of the first table of that name on the search path, or in
    any schema; None when there is none."""
    found = db.rows(conn, """
        SELECT n.nspname, c.relname, array(SELECT a.attname::text FROM pg_attribute a
                                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                           ORDER BY a.attnum)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname = %s AND c.relkind IN ('r', 'p')
        ORDER BY coalesce(array_position(current_schemas(false), n.nspname::text), 1000), n.nspname
        LIMIT 1""", (name,))
    return (found[0][0], found[0][1], list(found[0][2])) if found else None


def _rel(found: tuple) -> sql.Composable:
    return sql.SQL("{}.{}").format(sql.Identifier(found[0]), sql.Identifier(found[1]))


def heads(conn) -> Dict[str, str]:
    """Each framework's head, in its own terms: Django's newest migration per app, Alembic's
    revisions, Flyway's newest successful version, Rails' and golang-migrate's newest version,
    Prisma's newest finished migration, Liquibase's last changeset; the toolkit's own newest."""
    out: Dict[str, str] = {}
    found = _table(conn, "schema_migrations")
    if found:
        cols = set(found[2])
        newest = db.scalar(conn, sql.SQL("SELECT max(version)::text FROM {}").format(_rel(found)))
        if {"name", "checksum"} <= cols:
            name = TOOLKIT
        elif "dirty" in cols:
            name = "golang-migrate"
            dirty = db.scalar(conn, sql.SQL("SELECT bool_or(dirty) FROM {}").format(_rel(found)))
            newest = f"{newest} (dirty)" if newest and dirty else newest
        else:
            name = "rails"
        out[name] = newest or "(none applied)"
    found = _table(conn, "django_migrations")
    if found:
        apps = db.rows(conn, sql.SQL("""SELECT DISTINCT ON (app) app, name FROM {}
                                        ORDER BY app, applied DESC, id DESC""").format(_rel(found)))
        out["django"] = ", ".join(f"{app} {name}" for app, name in apps) or "(none applied)"
    found = _table(conn, "alembic_version")
    if found:
        revisions = [r for (r,) in db.rows(conn, sql.SQL("SELECT version_num FROM {} ORDER BY 1").format(_rel(found)))]
        out["alembic"] = ", ".join(revisions) or "(base)"
    found = _table(conn, "flyway_schema_history")
    if found:
        row = db.rows(conn, sql.SQL("""SELECT coalesce(version, '(repeatable)'), description FROM {}
                                       WHERE success ORDER BY installed_rank DESC LIMIT 1""").format(_rel(found)))
        out["flyway"] = f"{row[0][0]} ({row[0][1]})" if row else "(none applied)"
    found = _table(conn, "_prisma_migrations")
    if found:
        row = db.rows(conn, sql.SQL("""SELECT migration_name FROM {} WHERE finished_at IS NOT NULL
                                       AND rolled_back_at IS NULL ORDER BY finished_at DESC, migration_name DESC
                                       LIMIT 1""").format(_rel(found)))
        out["prisma"] = row[0][0] if row else "(none applied)"
    found = _table(conn, "databasechangelog")
    if found:
        row = db.rows(conn, sql.SQL("""SELECT id, author, filename FROM {}
                                       ORDER BY orderexecuted DESC LIMIT 1""").format(_rel(found)))
        out["liquibase"] = f"{row[0][0]} by {row[0][1]} ({row[0][2]})" if row else "(none applied)"
    return out


def applied(conn) -> Dict[str, Set[str]]:
    """Every migration each framework records as applied, in the form its code names them (for
    common.files.appcode): Django 'app name', Alembic revisions, Flyway and Rails versions, Prisma names."""
    out: Dict[str, Set[str]] = {}
    queries = {
        "django": ("django_migrations", "SELECT app || ' ' || name FROM {}"),
        "alembic": ("alembic_version", "SELECT version_num FROM {}"),
        # a baseline row stands for versions the code may not have as files: not a migration
        "flyway": ("flyway_schema_history", "SELECT version FROM {} WHERE success AND version IS NOT NULL "
                                            "AND type NOT IN ('BASELINE', 'SQL_BASELINE', 'JDBC_BASELINE', 'DELETE')"),
        "prisma": ("_prisma_migrations", "SELECT migration_name FROM {} WHERE finished_at IS NOT NULL "
                                         "AND rolled_back_at IS NULL"),
    }
    for name, (table, query) in queries.items():
        found = _table(conn, table)
        if found:
            out[name] = {r for (r,) in db.rows(conn, sql.SQL(query).format(_rel(found)))}
    found = _table(conn, "schema_migrations")
    if found and set(found[2]) == {"version"}:
        out["rails"] = {r for (r,) in db.rows(conn, sql.SQL("SELECT version FROM {}").format(_rel(found)))}
    return out


def managed_by(found: Dict[str, str]) -> List[str]:
    """The frameworks other than the toolkit that manage this database."""
    return [name for name in found if name != TOOLKIT]


def describe(found: Optional[Dict[str, str]]) -> str:
    """One line: 'django: shop 0001_initial, auth 0012_...; alembic: a1' ('-' when none)."""
    if not found:
        return "-"
    return "; ".join(f"{name}: {head}" for name, head in found.items())
