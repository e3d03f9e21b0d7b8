"""Database-level properties: what belongs to a database but not to its data (DESIGN §5).

Owner, ACL, comment, connection limit, tablespace, `ALTER DATABASE ... SET` and
`ALTER ROLE ... IN DATABASE ... SET` settings live in shared catalogs keyed by the database's OID,
so neither a dump nor a TEMPLATE copy carries them, and a rename swap leaves them with the old OID.
A rollback point records them; every restore sets them on the new database before the swap."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import psycopg2
from psycopg2 import sql

from ..errors import RollbackError
from . import database as db

# Settings whose value is a list: pg_dump quotes each element on its own (makeAlterConfigCommand),
# or `search_path = '"$user", public'` would become one schema named `"$user", public`.
LIST_SETTINGS = {"search_path", "temp_tablespaces", "local_preload_libraries", "session_preload_libraries",
                 "shared_preload_libraries", "unix_socket_directories"}
PRIVILEGES = {"CREATE": "C", "TEMPORARY": "T", "CONNECT": "c"}


class PropertyNotSettable(RollbackError):
    """The running role may not set a property the rollback point records."""


@dataclass
class DatabaseProperties:
    """The properties of one database; `acl` is the effective one (the default spelled out), as
    sorted [grantee, privilege, grantable, grantor] entries, grantee '' for PUBLIC."""

    owner: str
    acl: List[list] = field(default_factory=list)
    acl_default: bool = True
    comment: Optional[str] = None
    connection_limit: int = -1
    settings: List[str] = field(default_factory=list)
    role_settings: Dict[str, List[str]] = field(default_factory=dict)
    tablespace: Optional[str] = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Optional[dict]) -> Optional["DatabaseProperties"]:
        if not data:
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        props = cls(**known)
        props.acl = sorted(list(e) for e in props.acl)
        return props

    def comparable(self) -> dict:
        """What must be equal for two databases to have the same properties."""
        data = self.to_json()
        data.pop("acl_default")
        return data


def read(conn, dbname: str) -> Optional[DatabaseProperties]:
    """The properties of a database as they are now (None when it does not exist)."""
    found = db.rows(conn, """
        SELECT d.oid, pg_get_userbyid(d.datdba), d.datacl IS NULL, shobj_description(d.oid, 'pg_database'),
               d.datconnlimit, NULLIF(t.spcname, 'pg_default')
        FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s""", (dbname,))
    if not found:
        return None
    oid, owner, acl_default, comment, limit, tablespace = found[0]
    acl = db.rows(conn, """
        SELECT coalesce(pg_get_userbyid(nullif(a.grantee, 0)), ''), a.privilege_type, a.is_grantable,
               pg_get_userbyid(a.grantor)
        FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
        WHERE d.oid = %s ORDER BY 1, 2, 3, 4""", (oid,))
    settings: List[str] = []
    role_settings: Dict[str, List[str]] = {}
    for role, config in db.rows(conn, """
            SELECT CASE WHEN setrole = 0 THEN NULL ELSE pg_get_userbyid(setrole) END, setconfig
            FROM pg_db_role_setting WHERE setdatabase = %s""", (oid,)):
        if role is None:
            settings = sorted(config or [])
        elif config:
            role_settings[role] = sorted(config)
    return DatabaseProperties(owner=owner, acl=[list(e) for e in acl], acl_default=bool(acl_default),
                              comment=comment, connection_limit=limit, settings=settings,
                              role_settings=dict(sorted(role_settings.items())), tablespace=tablespace)


def blank(owner: str, tablespace: Optional[str]) -> DatabaseProperties:
    """The properties of a database just made by CREATE DATABASE ... OWNER owner."""
    default = [["", "CONNECT", False, owner], ["", "TEMPORARY", False, owner]]
    default += [[owner, p, False, owner] for p in ("CONNECT", "CREATE", "TEMPORARY")]
    return DatabaseProperties(owner=owner, acl=sorted(default), tablespace=tablespace)


@dataclass
class Statement:
    """One statement that sets a property, and the words that name that property to an operator."""

    what: str
    query: sql.Composable
    kind: str = ""
    subject: str = ""


def statements(dbname: str, current: DatabaseProperties, wanted: DatabaseProperties) -> List[Statement]:
    """What turns a database with `current` properties into one with `wanted` (tablespace aside:
    it is chosen when the database is created)."""
    name = sql.Identifier(dbname)
    out: List[Statement] = []
    if current.owner != wanted.owner:
        out.append(Statement(f"owner {wanted.owner}", sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            name, sql.Identifier(wanted.owner)), "owner", wanted.owner))
    if sorted(current.acl) != sorted(wanted.acl):
        grantees = {e[0] for e in current.acl} | {"", wanted.owner}
        for grantee in sorted(grantees):
            out.append(Statement("ACL (revoke before granting as recorded)", sql.SQL(
                "REVOKE ALL ON DATABASE {} FROM {} CASCADE").format(name, _grantee(grantee)), "acl", grantee))
        for grantee, privilege, grantable, grantor in sorted(wanted.acl):
            grant = sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(privilege), name, _grantee(grantee), sql.SQL(" WITH GRANT OPTION" if grantable else ""))
            if grantor != wanted.owner:  # a grant made by a holder of the grant option, as that holder
                grant = sql.SQL("SET ROLE {}; {}; RESET ROLE").format(sql.Identifier(grantor), grant)
            out.append(Statement(f"ACL: {privilege} to {grantee or 'PUBLIC'} (granted by {grantor})", grant,
                                 "acl", grantee or "PUBLIC"))
    if current.comment != wanted.comment:
        out.append(Statement("comment", sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            name, sql.Literal(wanted.comment)), "comment"))
    if current.connection_limit != wanted.connection_limit:
        out.append(Statement(f"connection limit {wanted.connection_limit}", sql.SQL(
            "ALTER DATABASE {} WITH CONNECTION LIMIT {}").format(name, sql.Literal(wanted.connection_limit)),
            "limit"))
    if current.settings != wanted.settings:
        if current.settings:
            out.append(Statement("database settings (reset before setting)",
                                 sql.SQL("ALTER DATABASE {} RESET ALL").format(name), "setting"))
        for item in wanted.settings:
            out.append(Statement(f"setting {item}", sql.SQL("ALTER DATABASE {} SET {}").format(
                name, assignment(item)), "setting", item.partition("=")[0]))
    for role in sorted(set(current.role_settings) | set(wanted.role_settings)):
        before, after = current.role_settings.get(role, []), wanted.role_settings.get(role, [])
        if before == after:
            continue
        ident = sql.Identifier(role)
        if before:
            out.append(Statement(f"settings of role {role} in this database (reset)", sql.SQL(
                "ALTER ROLE {} IN DATABASE {} RESET ALL").format(ident, name), "role_setting", role))
        for item in after:
            out.append(Statement(f"setting of role {role}: {item}", sql.SQL("ALTER ROLE {} IN DATABASE {} SET {}").format(
                ident, name, assignment(item)), "role_setting", role))
    return out


def _grantee(grantee: str) -> sql.Composable:
    return sql.SQL("PUBLIC") if grantee == "" else sql.Identifier(grantee)


def assignment(item: str) -> sql.Composable:
    """`name=value` as stored in setconfig -> `name = 'value'` (list settings element by element)."""
    name, _, value = item.partition("=")
    ident = sql.SQL(".").join(sql.Identifier(part) for part in name.split("."))
    if name.lower() in LIST_SETTINGS:
        values = [sql.Literal(v) for v in split_list(value)] or [sql.Literal("")]
        return sql.SQL("{} = {}").format(ident, sql.SQL(", ").join(values))
    return sql.SQL("{} = {}").format(ident, sql.Literal(value))


def split_list(value: str) -> List[str]:
    """PostgreSQL's SplitGUCList: comma-separated, elements optionally in double quotes ("" = ")."""
    items, i, n = [], 0, len(value)
    while i < n:
        while i < n and value[i].isspace():
            i += 1
        if i >= n:
            break
        if value[i] == '"':
            i += 1
            word = []
            while i < n:
                if value[i] == '"':
                    if i + 1 < n and value[i + 1] == '"':
                        word.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                word.append(value[i])
                i += 1
            items.append("".join(word))
        else:
            start = i
            while i < n and value[i] != ",":
                i += 1
            items.append(value[start:i].rstrip())
        while i < n and value[i] != ",":
            i += 1
        i += 1
    return items


def apply(conn, dbname: str, wanted: DatabaseProperties) -> List[str]:
    """Give a database the wanted properties in one transaction, then read them back: returns what
    was set; raises PropertyNotSettable (nothing set) or a RollbackError when they do not match."""
    current = read(conn, dbname)
    todo = statements(dbname, current, wanted)
    _run(conn, todo, commit=True)
    after = read(conn, dbname)
    if after.comparable() != wanted.comparable():
        raise RollbackError(f"database {dbname} does not have the recorded properties after setting them: "
                            + "; ".join(describe_changes(after, wanted)[:5]))
    return [s.what for s in todo if not s.what.endswith(")")]


def check_settable(conn, dbname: str, current: DatabaseProperties, wanted: DatabaseProperties) -> None:
    """Try the statements on an existing database in a transaction that is rolled back: the server
    itself says what this role may not set, before anything is touched."""
    _run(conn, statements(dbname, current, wanted), commit=False)


def _run(conn, todo: List[Statement], commit: bool) -> None:
    if not todo:
        return
    previous = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            for statement in todo:
                try:
                    cur.execute(statement.query)
                except psycopg2.Error as exc:
                    conn.rollback()
                    raise PropertyNotSettable(not_settable_message(conn, statement, exc)) from None
        if commit:
            conn.commit()
        else:
            conn.rollback()
    except BaseException:
        if not conn.closed and conn.status != psycopg2.extensions.STATUS_READY:
            conn.rollback()
        raise
    finally:
        if not conn.closed:
            conn.autocommit = previous


def not_settable_message(conn, statement: Statement, exc: psycopg2.Error) -> str:
    me = db.scalar(conn, "SELECT current_user")
    text = f"role {me} may not set the database property '{statement.what}' ({db.reason(exc)}). Nothing was changed."
    major = conn.server_version // 10000
    hints = {"role_setting": (f"let {me} manage role {statement.subject}: ALTER ROLE {me} CREATEROLE;"
                              + (f" GRANT {statement.subject} TO {me} WITH ADMIN OPTION;" if major >= 16 else "")),
             "setting": f"GRANT SET ON PARAMETER {statement.subject} TO {me};" if major >= 15 else "",
             "owner": f"GRANT {statement.subject} TO {me};"}
    hint = hints.get(statement.kind, "")
    if isinstance(exc, psycopg2.errors.UndefinedObject):
        hint = f"the role or object it names no longer exists: create it again ({statement.subject})"
    return (text + " Run the rollback as a role that may (a superuser), or, as a superuser, "
            + (hint if hint else "grant what the error names") + " Then run the rollback again.")


def describe_changes(current: Optional[DatabaseProperties], wanted: DatabaseProperties) -> List[str]:
    """The properties that differ, as the confirmation lists them: 'what: now -> then'."""
    if current is None:
        return []
    lines = []
    if current.owner != wanted.owner:
        lines.append(f"owner: {current.owner} -> {wanted.owner}")
    now, then = set(map(tuple, current.acl)), set(map(tuple, wanted.acl))
    for entry in sorted(then - now):
        lines.append(f"ACL: {entry[0] or 'PUBLIC'} gains {entry[1]}{' WITH GRANT OPTION' if entry[2] else ''}"
                     + (" (widens who may connect)" if entry[1] == "CONNECT" else ""))
    for entry in sorted(now - then):
        lines.append(f"ACL: {entry[0] or 'PUBLIC'} loses {entry[1]}{' WITH GRANT OPTION' if entry[2] else ''}")
    if current.comment != wanted.comment:
        lines.append(f"comment: {current.comment!r} -> {wanted.comment!r}")
    if current.connection_limit != wanted.connection_limit:
        lines.append(f"connection limit: {current.connection_limit} -> {wanted.connection_limit}")
    lines += _list_changes("setting", current.settings, wanted.settings)
    for role in sorted(set(current.role_settings) | set(wanted.role_settings)):
        lines += _list_changes(f"setting of role {role}", current.role_settings.get(role, []),
                               wanted.role_settings.get(role, []))
    if current.tablespace != wanted.tablespace:
        lines.append(f"tablespace: {current.tablespace or 'pg_default'} -> {wanted.tablespace or 'pg_default'}")
    return lines


def _list_changes(what: str, before: List[str], after: List[str]) -> List[str]:
    old = dict(i.partition("=")[::2] for i in before)
    new = dict(i.partition("=")[::2] for i in after)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"{what} {key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
    return lines


def extensions_in_archive(toc: str) -> List[str]:
    """Extension names in a `pg_restore --list` (e.g. '2; 3079 16387 EXTENSION - citext')."""
    found = []
    for line in toc.splitlines():
        parts = line.split()
        if not line.startswith(";") and len(parts) >= 6 and parts[3] == "EXTENSION" and parts[4] == "-":
            found.append(parts[5])
    return found


def uncreatable_extensions(conn, names: List[str]) -> List[Tuple[str, str]]:
    """(extension, why) for each extension this role could not create in a new database."""
    if not names:
        return []
    superuser = db.scalar(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    trusted = "v.trusted" if conn.server_version >= 130000 else "false"
    known = {r[0]: r[1] for r in db.rows(conn, f"""
        SELECT a.name, coalesce({trusted}, false) FROM pg_available_extensions a
        LEFT JOIN pg_available_extension_versions v ON v.name = a.name AND v.version = a.default_version
        WHERE a.name = ANY(%s)""", (list(names),))}
    problems = []
    for name in names:
        if name not in known:
            problems.append((name, "it is not installed on this server (its files are missing)"))
        elif not superuser and not known[name] and name != "plpgsql":
            problems.append((name, "it is not a trusted extension, so only a superuser may create it"))
    return problems
