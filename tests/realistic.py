"""A realistic staging database and a full fingerprint of it.

The database is owned by an ordinary login role with CREATEDB (and CREATEROLE, with which it made
its own reader role), not a superuser. It holds what real schemas hold: partitioned tables, a
materialized view, triggers, domains, enums, row-level security, large objects, trusted extensions,
grants to the reader role, and database-level properties set by a DBA (REVOKE from PUBLIC, comment,
connection limit, ALTER DATABASE / ALTER ROLE ... IN DATABASE settings)."""
from __future__ import annotations

from typing import Dict, Optional
from urllib.parse import quote

from psycopg2 import sql

from common.pg.database import connect, rows
from common.testing.testserver import ThrowawayServer
from tests import pgfixtures as pf

# Run as the owner role: every object is the owner's. Trusted contrib extensions where the server
# has them (pgserver's PostgreSQL 16 wheel ships none: there the email domain is over text).
EXTENSIONS = """
CREATE EXTENSION citext;
CREATE EXTENSION pg_trgm;
"""
SCHEMA = r"""
CREATE SCHEMA app;
CREATE TYPE app.status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE DOMAIN app.email AS {email_type} CHECK (VALUE ~ '^[^@]+@[^@]+$');
CREATE DOMAIN app.money_amount AS numeric(12, 2) CHECK (VALUE >= 0);
CREATE TABLE app.customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email app.email UNIQUE NOT NULL,
    name text NOT NULL, tenant text NOT NULL DEFAULT 'acme', updated_at timestamptz);
CREATE INDEX customers_name_idx ON app.customers USING {name_index};
CREATE TABLE app.orders (
    id bigserial, customer_id bigint NOT NULL REFERENCES app.customers(id), status app.status NOT NULL,
    total app.money_amount, ordered_on date NOT NULL, note text, PRIMARY KEY (id, ordered_on)
) PARTITION BY RANGE (ordered_on);
CREATE TABLE app.orders_2024 PARTITION OF app.orders FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE app.orders_2025 PARTITION OF app.orders FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE app.orders_other PARTITION OF app.orders DEFAULT;
CREATE TABLE app.audit (id bigserial PRIMARY KEY, tbl text, op text, row_id bigint, at timestamptz);
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := '2025-06-01 12:00:00+00'; RETURN NEW; END $$;
CREATE FUNCTION app.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO app.audit (tbl, op, row_id, at) VALUES (TG_TABLE_NAME, TG_OP, NEW.id, '2025-06-01 12:00:00+00');
RETURN NEW; END $$;
CREATE TRIGGER customers_touch BEFORE INSERT OR UPDATE ON app.customers FOR EACH ROW EXECUTE FUNCTION app.touch();
CREATE TRIGGER customers_audit AFTER INSERT ON app.customers FOR EACH ROW EXECUTE FUNCTION app.audit_row();
INSERT INTO app.customers (email, name, tenant)
  SELECT 'user' || i || '@Example.com', 'Customer ' || i || ' Ünïcødé', (ARRAY['acme', 'globex'])[1 + i % 2]
  FROM generate_series(1, 300) i;
INSERT INTO app.orders (customer_id, status, total, ordered_on, note)
  SELECT 1 + i % 300, (ARRAY['new', 'paid', 'shipped', 'cancelled'])[1 + i % 4]::app.status,
         (i * 3.17)::numeric(12, 2), date '2024-03-01' + (i % 700), CASE WHEN i % 7 = 0 THEN NULL ELSE 'n' || i END
  FROM generate_series(1, 2000) i;
CREATE MATERIALIZED VIEW app.revenue AS
  SELECT date_trunc('month', ordered_on) AS month, status, sum(total) AS total, count(*) AS orders
  FROM app.orders GROUP BY 1, 2;
CREATE UNIQUE INDEX revenue_month_status ON app.revenue (month, status);
ALTER TABLE app.customers ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON app.customers USING (tenant = current_setting('app.tenant', true));
CREATE TABLE app.documents (id int PRIMARY KEY, title text, body oid);
INSERT INTO app.documents SELECT i, 'doc ' || i, lo_from_bytea(0, convert_to(repeat('page ' || i || ' ', 200), 'UTF8'))
  FROM generate_series(1, 5) i;
CREATE SEQUENCE app.invoice_no START 1000;
SELECT setval('app.invoice_no', 1042);
"""

MIGRATION = r"""
ALTER TABLE app.customers ADD COLUMN vip boolean NOT NULL DEFAULT false;
UPDATE app.customers SET vip = true, name = upper(name) WHERE id % 3 = 0;
DELETE FROM app.orders WHERE ordered_on < '2024-09-01';
INSERT INTO app.orders (customer_id, status, total, ordered_on) VALUES (1, 'new', 1, '2026-02-02');
REFRESH MATERIALIZED VIEW app.revenue;
ALTER TYPE app.status ADD VALUE 'refunded';
DROP POLICY tenant_isolation ON app.customers;
SELECT lo_unlink(body) FROM app.documents WHERE id = 1;
UPDATE app.documents SET body = lo_from_bytea(0, 'replaced') WHERE id = 2;
SELECT nextval('app.invoice_no') FROM generate_series(1, 10);
CREATE TABLE app.new_feature (id int);
"""

# Run as a superuser, as a DBA would, on the database NAME for the roles OWNER and READER.
DATABASE_PROPERTIES = """
REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC;
GRANT CONNECT ON DATABASE {db} TO {reader};
COMMENT ON DATABASE {db} IS 'Staging for the V2 migration: ask #data before changing';
ALTER DATABASE {db} WITH CONNECTION LIMIT 40;
ALTER DATABASE {db} SET work_mem = '8MB';
ALTER DATABASE {db} SET search_path = "$user", app, public;
ALTER ROLE {reader} IN DATABASE {db} SET statement_timeout = '5s';
ALTER ROLE {owner} IN DATABASE {db} SET lock_timeout = '2s';
"""

# What a migration does to the database itself (run by the owner).
PROPERTY_MIGRATION = """
GRANT CONNECT, TEMPORARY ON DATABASE {db} TO PUBLIC;
COMMENT ON DATABASE {db} IS 'changed by the migration';
ALTER DATABASE {db} WITH CONNECTION LIMIT -1;
ALTER DATABASE {db} SET work_mem = '64MB';
ALTER DATABASE {db} RESET search_path;
ALTER ROLE {reader} IN DATABASE {db} RESET statement_timeout;
ALTER ROLE {owner} IN DATABASE {db} SET lock_timeout = '9s';
"""


class RealisticDatabase:
    """`with RealisticDatabase(server) as rd:` the database, its owner and reader roles; all dropped
    afterwards (with the databases the toolkit derived from it)."""

    def __init__(self, server: ThrowawayServer, createdb: bool = True, password: str = "0wner:p@ss/#1",
                 contrib: Optional[bool] = None):
        self.server, self.createdb, self.password = server, createdb, password
        self.contrib = contrib  # citext and pg_trgm: None uses them where the server has them
        self.owner, self.reader = pf.unique_name("owner"), pf.unique_name("reader")
        self.name = pf.unique_name("staging")

    @property
    def url(self) -> str:
        return (f"postgresql://{self.owner}:{quote(self.password, safe='')}@127.0.0.1:"
                f"{self.server.info.port}/{self.name}")

    def fill(self) -> "RealisticDatabase":
        s, q = self.server, self.quoted()
        pf.execute(s, "postgres", f"CREATE ROLE {q['owner']} LOGIN CREATEDB CREATEROLE PASSWORD "
                                  f"'{self.password}'")
        owner_conn = connect(s.info.__class__.parse(self.url).with_db("postgres"))
        with owner_conn.cursor() as cur:  # the owner makes its own reader role (ADMIN on it, 16+)
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(self.reader)))
        owner_conn.close()
        pf.execute(s, "postgres", f"CREATE DATABASE {q['db']} OWNER {q['owner']}")
        contrib = {"citext", "pg_trgm"} <= set(available_extensions(s)) if self.contrib is None else self.contrib
        self.as_owner((EXTENSIONS if contrib else "") + SCHEMA.replace("{email_type}", "citext" if contrib else "text")
                      .replace("{name_index}", "gin (name gin_trgm_ops)" if contrib else "btree (name)"))
        self.as_owner(f"GRANT USAGE ON SCHEMA app TO {q['reader']}; "
                      f"GRANT SELECT ON app.customers, app.revenue TO {q['reader']}; "
                      f"GRANT SELECT (id, status) ON app.orders TO {q['reader']}; "
                      f"ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO {q['reader']}; "
                      f"GRANT SELECT ON LARGE OBJECT {self.first_lo()} TO {q['reader']};")
        pf.execute(s, self.name, DATABASE_PROPERTIES.format(**q))
        if not self.createdb:
            pf.execute(s, "postgres", f"ALTER ROLE {q['owner']} NOCREATEDB")
        return self

    def quoted(self) -> Dict[str, str]:
        return {"db": f'"{self.name}"', "owner": f'"{self.owner}"', "reader": f'"{self.reader}"'}

    def first_lo(self) -> int:
        conn = connect(self.server.info, self.name)
        try:
            return rows(conn, "SELECT body FROM app.documents WHERE id = 3")[0][0]
        finally:
            conn.close()

    def as_owner(self, statements: str) -> None:
        conn = connect(self.server.info.__class__.parse(self.url))
        with conn.cursor() as cur:
            cur.execute(statements)
        conn.close()

    def migrate(self) -> None:
        """A migration that changes schema, rows, large objects and the database's own properties."""
        self.as_owner(MIGRATION)
        self.as_owner(PROPERTY_MIGRATION.format(**self.quoted()))

    def __enter__(self) -> "RealisticDatabase":
        return self.fill()

    def __exit__(self, *exc) -> None:
        conn = connect(self.server.info)
        try:
            names = [r[0] for r in rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s",
                                        (self.name + "%",))]
        finally:
            conn.close()
        for name in names:
            pf.drop_database(self.server, name)
        for role in (self.reader, self.owner):
            pf.execute(self.server, "postgres", f'DROP ROLE IF EXISTS "{role}"')


def database_fingerprint(server: ThrowawayServer, dbname: str) -> dict:
    """Everything a user could tell apart: schema with owners and privileges, every row, sequences,
    large objects, extensions, relation ACLs, and the database's own properties."""
    schema, data = pf.fingerprint(server, dbname)
    conn = connect(server.info, dbname)
    try:
        found = {
            "schema": schema, "rows": data,
            "matviews": rows(conn, """SELECT n.nspname, c.relname, c.relispopulated FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'm' ORDER BY 1, 2"""),
            "matview_rows": rows(conn, "SELECT md5(string_agg(r::text, ',' ORDER BY r::text)) FROM app.revenue r")
            if rows(conn, "SELECT to_regclass('app.revenue')")[0][0] else None,
            "large_objects": rows(conn, """SELECT m.oid, pg_get_userbyid(m.lomowner), m.lomacl::text,
                md5(lo_get(m.oid)) FROM pg_largeobject_metadata m ORDER BY 1"""),
            "extensions": rows(conn, """SELECT extname, extversion, pg_get_userbyid(extowner), n.nspname
                FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace ORDER BY 1"""),
            "relation_acls": rows(conn, """SELECT n.nspname, c.relname, pg_get_userbyid(c.relowner), c.relacl::text
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
                ORDER BY 1, 2"""),
            "policies": rows(conn, "SELECT schemaname, tablename, policyname, qual FROM pg_policies ORDER BY 1, 2, 3"),
            "rls": rows(conn, """SELECT relname, relrowsecurity FROM pg_class WHERE relrowsecurity ORDER BY 1"""),
        }
        found.update(database_level(conn, dbname))
    finally:
        conn.close()
    return found


def database_level(conn, dbname: str) -> dict:
    """The database's own properties, read here independently of common.pg.dbprops."""
    [(oid, owner, acl, comment, limit, tablespace, allow)] = rows(conn, """
        SELECT d.oid, pg_get_userbyid(d.datdba),
               (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(coalesce(d.datacl, acldefault('d', d.datdba))) a),
               shobj_description(d.oid, 'pg_database'), d.datconnlimit, t.spcname, d.datallowconn
        FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s""", (dbname,))
    settings = rows(conn, """SELECT coalesce(r.rolname, '(database)'), array_to_string(
            ARRAY(SELECT unnest(s.setconfig) ORDER BY 1), ' | ')
        FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole
        WHERE s.setdatabase = %s ORDER BY 1""", (oid,))
    return {"db_owner": owner, "db_acl": acl, "db_comment": comment, "db_connection_limit": limit,
            "db_tablespace": tablespace, "db_allows_connections": allow, "db_settings": settings}


def differences(a: dict, b: dict) -> list:
    """The fingerprint keys that differ (for a readable assertion message)."""
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def available_extensions(server: ThrowawayServer) -> list:
    conn = connect(server.info)
    try:
        return [r[0] for r in rows(conn, "SELECT name FROM pg_available_extensions")]
    finally:
        conn.close()
