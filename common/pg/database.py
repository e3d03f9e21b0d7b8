"""Connections and the database-level operations: create, rename, cut connections, count rows."""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from ..errors import ConfigError, ConnectionFailed
from ..log import get_logger, mask, register_secret

CONNECT_TIMEOUT = 5
APP_NAME = "rollback-toolkit"
# libpq settings that may ride along in a URL's query string and that tools take from PG* variables.
_QUERY_ENV = {"sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT",
              "sslkey": "PGSSLKEY", "target_session_attrs": "PGTARGETSESSIONATTRS",
              "options": "PGOPTIONS", "gssencmode": "PGGSSENCMODE"}


@dataclass(frozen=True)
class ConnInfo:
    """Where a database is and who connects: parsed once, the password kept out of every printout."""

    host: str = "localhost"
    port: int = 5432
    dbname: str = "postgres"
    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    params: tuple = ()

    @classmethod
    def parse(cls, url: str, what: str = "database URL") -> "ConnInfo":
        """A postgresql:// URL. A password holding @ : / # ? unencoded is taken as everything
        between the first ':' after the user and the last '@' (unambiguous: a host holds none of
        them); it is never printed, not even in part."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("postgres", "postgresql"):
            raise ConfigError(f"{what} must start with postgresql:// (got {_shown(url)!r})")
        userinfo, at, hostpart = _split_userinfo(rest)
        user = password = None
        if at:
            raw_user, colon, raw_password = userinfo.partition(":")
            user = unquote(raw_user) if raw_user else None
            if colon:
                # percent-encoded as it should be, or (when it holds a character that must be encoded) as typed
                password = raw_password if re.search(r"[@:/#?]", raw_password) else unquote(raw_password)
                register_secret(password)
                register_secret(raw_password)
        try:
            parts = urlsplit(f"{scheme}://{hostpart}")
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{what} is not a valid URL ({mask(str(exc))}): {_shown(url)}. A password with @ : / # ? "
                              "% must be percent-encoded in a URL (@ is %40, : is %3A, / is %2F, # is %23, ? is %3F, "
                              "% is %25).") from None
        query = dict(parse_qsl(parts.query))
        host = query.pop("host", None) or (unquote(parts.hostname) if parts.hostname else "localhost")
        if "port" in query:
            try:
                port = int(query.pop("port"))
            except ValueError:
                raise ConfigError(f"{what}: port must be a number ({_shown(url)})") from None
        dbname = unquote(parts.path[1:]) if parts.path and len(parts.path) > 1 else None
        dbname = query.pop("dbname", None) or dbname
        if not dbname:
            raise ConfigError(f"{what} names no database: {_shown(url)} (add /DBNAME after the host)")
        user = query.pop("user", None) or user
        if "password" in query:
            password = query.pop("password")
            register_secret(password)
        return cls(host=host, port=port or 5432, dbname=dbname, user=user, password=password,
                   params=tuple(sorted(query.items())))

    def with_db(self, dbname: str) -> "ConnInfo":
        return replace(self, dbname=dbname)

    def masked(self, dbname: Optional[str] = None) -> str:
        """The URL as it may be printed: postgresql://user:***@host:5432/db."""
        auth = ""
        if self.user:
            auth = quote(self.user, safe="") + (":***" if self.password else "") + "@"
        host = quote(self.host, safe="") if self.host.startswith("/") else self.host
        return f"postgresql://{auth}{host}:{self.port}/{quote(dbname or self.dbname, safe='')}"

    def libpq_env(self, dbname: Optional[str] = None) -> Dict[str, str]:
        """Everything a client tool needs but the password (which the runner passes as PGPASSWORD)."""
        env = {"PGHOST": self.host, "PGPORT": str(self.port), "PGDATABASE": dbname or self.dbname}
        if self.user:
            env["PGUSER"] = self.user
        for key, value in self.params:
            if key in _QUERY_ENV:
                env[_QUERY_ENV[key]] = value
        return env


def _split_userinfo(rest: str) -> tuple:
    """(userinfo, '@', host part) at the '@' after which a host and a /database or ?query follow: the
    last one, unless that '@' stands in the query (then the one before)."""
    positions = [i for i, ch in enumerate(rest) if ch == "@"]
    for pos in reversed(positions):
        tail = rest[pos + 1:]
        if re.match(r"^[^/?#@]*[/?]", tail):
            return rest[:pos], "@", tail
    return rest.rpartition("@")


def _shown(url: str) -> str:
    """A URL as it may be printed: everything between '://user:' and the host's '@' hidden."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = _split_userinfo(rest)
    if not sep or not at:
        return mask(url)
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in userinfo else ''}@{mask(hostpart)}"


def connect(info: ConnInfo, dbname: Optional[str] = None, autocommit: bool = True,
            app: str = APP_NAME):
    """A psycopg2 connection that fails within seconds with a one-line reason, never a hang."""
    target = dbname or info.dbname
    kwargs = {"host": info.host, "port": info.port, "dbname": target,
              "connect_timeout": CONNECT_TIMEOUT, "application_name": app}
    if info.user:
        kwargs["user"] = info.user
    if info.password:
        kwargs["password"] = info.password
    kwargs.update({k: v for k, v in info.params if k in _QUERY_ENV or k in ("connect_timeout",)})
    try:
        conn = psycopg2.connect(**kwargs)
    except psycopg2.OperationalError as exc:
        failed = ConnectionFailed(f"cannot connect to {info.masked(target)}: {_sentence(reason(exc))}")
        failed.reason = _sentence(reason(exc))
        raise failed from None
    conn.autocommit = autocommit
    return conn


def _sentence(text: str) -> str:
    """The server's reason as one sentence: 'connection refused; Is the server running ...?' ends
    in one full stop, not '?.'."""
    text = text.strip().rstrip(".")
    return text if text.endswith("?") else text + "."


def reason(exc: Exception) -> str:
    """The first lines of a psycopg2 error, without 'FATAL:' noise, passwords masked."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines[:2]) if lines else type(exc).__name__
    return mask(text.replace("FATAL:  ", ""))


def app_name(script: str) -> str:
    return f"{APP_NAME}/{script} pid={os.getpid()}"


def execute(conn, query, args=None) -> None:
    with conn.cursor() as cur:
        cur.execute(query, args)


def scalar(conn, query, args=None):
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
        return row[0] if row else None


def rows(conn, query, args=None) -> list:
    with conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall()


def server_version(conn) -> tuple:
    """(major, 'x.y') of the connected server, e.g. (15, '15.18')."""
    num = conn.server_version
    major = num // 10000
    return major, f"{major}.{num % 10000}"


def database_exists(conn, name: str) -> bool:
    return bool(scalar(conn, "SELECT 1 FROM pg_database WHERE datname = %s", (name,)))


def databases_like(conn, prefix: str) -> List[str]:
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return [r[0] for r in rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (like,))]


def database_size(conn, name: str) -> int:
    return int(scalar(conn, "SELECT pg_database_size(%s)", (name,)) or 0)


def can_create_databases(conn) -> bool:
    return bool(scalar(conn, "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"))


def user_tables(conn) -> List[tuple]:
    """(schema, table) of every ordinary table, largest first; leaf tables only, so partitioned
    data is counted once; tables of extensions left out."""
    return rows(conn, """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
        ORDER BY c.relpages DESC, 1, 2""")


def table_count(conn, schema: str, table: str, only: bool = False) -> int:
    """Rows of the table; with `only`, without its inheritance children's."""
    return int(scalar(conn, sql.SQL("SELECT count(*) FROM {}{}.{}").format(
        sql.SQL("ONLY " if only else ""), sql.Identifier(schema), sql.Identifier(table))))


def table_row_counts(conn) -> Dict[str, int]:
    """Exact rows of every ordinary table ('schema.table' -> count), in this connection's snapshot."""
    return {f"{s}.{t}": table_count(conn, s, t) for s, t in sorted(user_tables(conn))}


def count_rows_parallel(info: ConnInfo, workers: int = 2, analyze: bool = False,
                        opened: Sequence = ()) -> Dict[str, int]:
    """table_row_counts over several connections (largest tables first), for a database nobody
    else writes to; with analyze, an ANALYZE runs beside the counts (a restored database has no
    planner statistics). `opened`: connections to use (and close), for a database that no longer
    accepts new ones."""
    import queue
    import threading

    opened = list(opened)
    first = opened.pop(0) if opened else connect(info)
    jobs: "queue.Queue" = queue.Queue()
    if analyze:
        jobs.put(None)
    for schema, table in user_tables(first):
        jobs.put((schema, table))
    counts: Dict[str, int] = {}
    errors: List[BaseException] = []

    def work(conn) -> None:
        try:
            while True:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    return
                if job is None:
                    execute(conn, "ANALYZE")
                else:
                    counts[f"{job[0]}.{job[1]}"] = table_count(conn, *job)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)
        finally:
            conn.close()

    more = max(0, min(workers, jobs.qsize()) - 1)
    conns = [first] + opened[:more] + [connect(info) for _ in range(more - len(opened[:more]))]
    for spare in opened[more:]:
        spare.close()
    threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return dict(sorted(counts.items()))


def migration_head(conn) -> Optional[str]:
    """The newest applied migration version, when the database tracks them in schema_migrations."""
    if not scalar(conn, "SELECT to_regclass('public.schema_migrations') IS NOT NULL"):
        return None
    return scalar(conn, "SELECT max(version) FROM public.schema_migrations")


@dataclass
class Session:
    pid: int
    user: str
    application: str
    client: str
    state: str
    since: str
    query: str

    def describe(self) -> str:
        if self.query == "<insufficient privilege>":  # another role's session, seen without pg_read_all_stats
            return (f"pid {self.pid} {self.user or '(no user)'} (its application, start and query are hidden "
                    "from this role; GRANT pg_read_all_stats shows them)")
        app = f" {self.application}" if self.application else ""
        return f"pid {self.pid} {self.user}{app} from {self.client} ({self.state}, since {self.since}): {self.query}"


def sessions(conn, dbname: str, exclude: Sequence[int] = ()) -> List[Session]:
    """Other sessions connected to a database (but the pids in `exclude`), longest-running
    transaction first. Autovacuum
    workers are not among them (they have no user, and a non-superuser sees no backend_type of
    theirs): before PostgreSQL 18 a non-superuser may not terminate them, and a rename, a TEMPLATE
    copy or a DROP DATABASE makes them exit anyway (after a 100 ms sleep: end_autovacuum_workers
    ends them first where the role may)."""
    found = rows(conn, """
        SELECT pid, coalesce(usename, ''), coalesce(application_name, ''),
               coalesce(host(client_addr), 'local socket'), coalesce(state, ''),
               coalesce(to_char(coalesce(xact_start, backend_start), 'YYYY-MM-DD HH24:MI:SS'), '?'),
               left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 80)
        FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() AND pid <> ALL(%s::int[])
          AND usesysid IS NOT NULL AND backend_type IS DISTINCT FROM 'autovacuum worker'
        ORDER BY xact_start NULLS LAST, backend_start""", (dbname, list(exclude)))
    return [Session(*r) for r in found]


def end_starting_sessions(conn, dbname: str, wait: float = 0.5) -> int:
    """End the connections to the database that are still starting, and wait for them to go; returns
    how many were ended. A connecting backend takes the database's lock before it checks
    ALLOW_CONNECTIONS, and shows in pg_stat_activity only at the end of its start: one that passed
    the check just before connections were turned off is seen here, by its lock, and nowhere else,
    and would make a rename wait for it in steps of 100 ms."""
    ended: set = set()
    left: set = set()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        starting = [r[0] for r in rows(conn, """
            SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.objid
            WHERE l.locktype = 'object' AND l.classid = 'pg_database'::regclass AND d.datname = %s
              AND l.pid <> pg_backend_pid() AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.pid)""",
                                          (dbname,))]
        if not starting:
            break
        for pid in starting:
            if pid in ended or pid in left:
                continue
            try:
                if scalar(conn, "SELECT pg_terminate_backend(%s)", (pid,)):
                    ended.add(pid)
            except psycopg2.errors.InsufficientPrivilege:
                # another superuser's, or a starting autovacuum worker: once it shows in
                # pg_stat_activity it is the rename's to wait for (or the next cut's to name)
                left.add(pid)
        time.sleep(0.005)
    return len(ended)


def end_autovacuum_workers(conn, dbname: str, wait: float = 0.5) -> int:
    """End the autovacuum workers in the database, where this role may (a superuser; from PostgreSQL
    18 a member of pg_signal_autovacuum_worker), and wait for them to go; returns how many were
    ended. A rename ends them itself, but only after a fixed 100 ms sleep (measured: ALTER DATABASE
    ... RENAME took 100.9 ms with a worker vacuuming, 0.3 ms without). The vacuum is only
    interrupted: autovacuum takes it up again later."""
    ended: List[int] = []
    for (pid,) in rows(conn, "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'autovacuum worker'",
                       (dbname,)):
        try:
            if scalar(conn, "SELECT pg_terminate_backend(%s)", (pid,)):
                ended.append(pid)
        except psycopg2.errors.InsufficientPrivilege:
            pass  # the rename ends it
    deadline = time.monotonic() + wait
    while ended and time.monotonic() < deadline:
        if not rows(conn, "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (ended,)):
            break
        time.sleep(0.005)
    return len(ended)


def set_allow_connections(conn, dbname: str, allowed: bool) -> None:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(dbname), sql.SQL("true" if allowed else "false")))


def allows_connections(conn, dbname: str) -> Optional[bool]:
    return scalar(conn, "SELECT datallowconn FROM pg_database WHERE datname = %s", (dbname,))


def terminate_sessions(conn, dbname: str, wait: float = 5.0, exclude: Sequence[int] = ()) -> Tuple[int, List[Session]]:
    """Cut every other session of the database that this role may cut, then wait up to `wait` s
    for them to end; returns (how many were cut, the sessions it may not cut, e.g. another
    superuser's). All are signalled first and waited for together, polling every 5 ms:
    pg_terminate_backend(pid, timeout) checks in steps of 100 ms, so cutting 4 clients one by one
    kept staging closed for 440 ms (measured in benchmarks/run.py) instead of a few ms."""
    signalled, refused = [], []
    for session in sessions(conn, dbname, exclude):
        try:
            if scalar(conn, "SELECT pg_terminate_backend(%s)", (session.pid,)):
                signalled.append(session.pid)
        except psycopg2.errors.InsufficientPrivilege:
            refused.append(session)
    deadline = time.monotonic() + wait
    alive = list(signalled)
    while alive and time.monotonic() < deadline:
        time.sleep(0.005)
        alive = [r[0] for r in rows(conn, "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (alive,))]
    if alive:
        get_logger().warning("%d cut session(s) of %s had not ended after %.0f s: pid %s", len(alive), dbname,
                             wait, ", ".join(map(str, alive)))
    return len(signalled), refused


def create_database(conn, name: str, template: Optional[str] = None, like: Optional[str] = None,
                    owner: Optional[str] = None, tablespace: Optional[str] = None) -> None:
    """CREATE DATABASE name [TEMPLATE t]; with `like`, the owner, encoding and locale of that
    database (`owner` and `tablespace`, when given, win)."""
    parts = [sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))]
    if template:
        parts.append(sql.SQL("TEMPLATE {}").format(sql.Identifier(template)))
        if conn.server_version >= 150000:
            # Copy the files after a checkpoint instead of writing every page to WAL (the default
            # since 15): measured here, 1.2 s instead of 1.7 s for 660 MB.
            parts.append(sql.SQL("STRATEGY FILE_COPY"))
    if like:
        like_owner, encoding, collate, ctype = rows(conn, """
            SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype
            FROM pg_database WHERE datname = %s""", (like,))[0]
        owner = owner or like_owner
        if not template:
            parts.append(sql.SQL("TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                sql.Literal(encoding), sql.Literal(collate), sql.Literal(ctype)))
    if owner:
        parts.append(sql.SQL("OWNER {}").format(sql.Identifier(owner)))
    if tablespace:
        parts.append(sql.SQL("TABLESPACE {}").format(sql.Identifier(tablespace)))
    statement = sql.SQL(" ").join(parts)
    clone = bool(template) and conn.server_version >= 180000
    with conn.cursor() as cur:
        if not clone:
            cur.execute(statement)
            return
        # PostgreSQL 18 can copy the files with copy_file_range() (file_copy_method = clone, a
        # user setting): on a copy-on-write file system (XFS with reflink, btrfs) that shares the
        # blocks, so the copy costs almost nothing at any size; elsewhere the kernel copies them.
        # A file system that refuses ("could not clone file") gets the ordinary copy instead.
        cur.execute("SET file_copy_method = clone")
        try:
            cur.execute(statement)
        except psycopg2.Error as exc:
            if "clone" not in str(exc):
                raise
            if not conn.autocommit:
                conn.rollback()
            cur.execute("RESET file_copy_method")
            cur.execute(statement)
        finally:
            if not conn.closed and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                cur.execute("RESET file_copy_method")


def drop_database(conn, name: str) -> None:
    """DROP DATABASE after cutting its sessions ourselves: WITH (FORCE) would also try to terminate
    autovacuum workers, which a non-superuser may not ("must be a member of the role whose process
    is being terminated"); a plain DROP makes them exit by itself."""
    if database_exists(conn, name):
        try:
            set_allow_connections(conn, name, False)
            terminate_sessions(conn, name)
        except psycopg2.errors.InsufficientPrivilege:
            pass  # not ours to cut: the DROP itself says so if it cannot go ahead
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def rename_database(conn, name: str, new_name: str, allow: bool = False) -> None:
    """With allow, the renamed database (a sealed copy) accepts connections in the same commit."""
    _renames(conn, [(name, new_name)], new_name if allow else None)


def swap_names(conn, target: str, replacement: str, keep_as: str, allow: bool = False) -> None:
    """Rename target -> keep_as and replacement -> target in one transaction: both or neither.
    (PostgreSQL allows renames in a transaction block; CREATE/DROP DATABASE it does not.) With
    allow, the replacement (a sealed copy) accepts connections from the same commit on."""
    _renames(conn, [(target, keep_as), (replacement, target)], target if allow else None)


# A rename waits for every other backend of the database, including one still exiting after its
# client closed (invisible to pg_stat_activity by then), in fixed sleeps of 100 ms: measured as
# 100.9 ms in 1 of 20 swaps while a client reconnected every 5 ms. A statement timeout interrupts
# that sleep, so each try is cut short at RENAME_TRY_MS and the whole transaction tried again, for
# up to RENAME_QUICK_SECONDS; then once without a timeout (the server's own wait and its error).
RENAME_TRY_MS = 20
RENAME_QUICK_SECONDS = 1.0


def _renames(conn, pairs: Sequence[Tuple[str, str]], allow: Optional[str]) -> None:
    previous = conn.autocommit
    conn.autocommit = False
    began = time.monotonic()
    tries = 0
    try:
        while True:
            tries += 1
            quick = time.monotonic() - began < RENAME_QUICK_SECONDS
            try:
                with conn.cursor() as cur:
                    if quick:
                        cur.execute("SET LOCAL statement_timeout = %s", (RENAME_TRY_MS,))
                    for old, new in pairs:
                        cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old),
                                                                                  sql.Identifier(new)))
                    if allow:
                        cur.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(allow)))
                conn.commit()
                break
            except psycopg2.errors.QueryCanceled:
                conn.rollback()  # nothing was renamed
                if not quick:
                    raise
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = previous
    get_logger().debug("renamed %s in %.1f ms (%d tr%s)", ", ".join(f"{o} to {n}" for o, n in pairs),
                       (time.monotonic() - began) * 1000, tries, "y" if tries == 1 else "ies")


def maintenance_db(info: ConnInfo, app: str = APP_NAME):
    """A connection to the server's maintenance database (postgres, else template1), never to the
    database being replaced: a session there would block its rename."""
    try:
        return connect(info, "postgres", app=app)
    except ConnectionFailed as first:
        try:
            return connect(info, "template1", app=app)
        except ConnectionFailed:
            # named as the user configured it: the database they set, not the maintenance one
            failed = ConnectionFailed(f"cannot connect to the server of {info.masked()}: {getattr(first, 'reason', first)}")
            failed.reason = getattr(first, "reason", str(first))
            raise failed from None


def log_sessions(found: List[Session]) -> None:
    log = get_logger()
    for s in found:
        log.info("  %s", s.describe())


def derived_name(target: str, tag: str, stamp: str, sep: str = "__") -> str:
    """`<target>__<tag>_<stamp>`, shortened with a hash of the target when it would pass
    PostgreSQL's 63-byte name limit (the server would silently cut it)."""
    return name_prefix(target, tag, sep) + stamp


def name_prefix(target: str, tag: str, sep: str = "__") -> str:
    prefix = f"{target}{sep}{tag}_"
    if len((prefix + "20250101_000000_000").encode()) <= 63:
        return prefix
    short = hashlib.sha256(target.encode()).hexdigest()[:8]
    room = 63 - len(f"_{short}{sep}{tag}_20250101_000000_000")
    head = target.encode()[:room].decode("utf-8", "ignore")
    return f"{head}_{short}{sep}{tag}_"
