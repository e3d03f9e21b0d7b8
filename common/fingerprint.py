"""A database's fingerprint: content and schema, computed by the server (DESIGN §4, "Fingerprint").

For each table, its row count and an order-independent hash of every row (the sum of a 64-bit hash
of each row's text, so no sort is needed); for a table with a primary key, the same per key range
(up to RANGES ranges, in key order), so that a difference can be located. Sequences (last value),
large objects (an md5 of each), and a hash per schema object: columns with their types and
defaults, constraints, indexes, views, functions, triggers, policies, grants, extensions, comments.

Row text depends on session settings, so they are fixed: UTC, ISO dates, shortest exact floats,
hex bytea. Taken in the snapshot pg_dump exports, it describes exactly what the dump holds.
Compared with `differences`, which names each table, key range, object and sequence that differs."""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Optional

from psycopg2 import sql

from . import database as db

FORMAT = 1
RANGES = 64
ROWS_PER_RANGE = 1000
SESSION = ("SET TimeZone = 'UTC'", "SET DateStyle = 'ISO, YMD'", "SET IntervalStyle = 'postgres'",
           "SET extra_float_digits = 1", "SET bytea_output = 'hex'", "SET search_path = pg_catalog")
# hashtextextended: the server's 64-bit hash of text (what hash partitioning uses, so stable across
# majors), several times cheaper per row than md5.
_ROW_HASH = "hashtextextended({}::text, 0)::numeric"


def prepare(conn) -> None:
    """The session settings every fingerprint is taken with (row text must not depend on them)."""
    for statement in SESSION:
        db.execute(conn, statement)


def _tables(conn) -> List[tuple]:
    """(schema, table, primary key columns) of every ordinary table, as db.user_tables sees them."""
    return [(s, t, list(k or [])) for s, t, k in db.rows(conn, """
        SELECT n.nspname, c.relname,
               (SELECT array_agg(a.attname ORDER BY array_position(i.indkey::int2[], a.attnum))
                FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                WHERE i.indrelid = c.oid AND i.indisprimary)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
        ORDER BY c.relpages DESC, 1, 2""")]


def table(conn, schema: str, name: str, key: List[str]) -> dict:
    """Rows and content hash of one table; with a key, per key range too."""
    rel = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))
    row_hash = sql.SQL(_ROW_HASH).format(sql.Identifier("t"))
    if not key:
        count, total = db.rows(conn, sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM {} t").format(row_hash, rel))[0]
        return {"rows": int(count), "hash": str(total)}
    rows = int(db.scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(rel)))
    ranges = max(1, min(RANGES, -(-rows // ROWS_PER_RANGE)))
    keys = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in key)
    if len(key) == 1:  # the key's own type orders the range's ends (text would put 10 before 9)
        ends = sql.SQL("min(k)::text, max(k)::text")
        key_value = sql.SQL("t.{}").format(sql.Identifier(key[0]))
    else:
        ends = sql.SQL("(array_agg(k::text ORDER BY rn))[1], (array_agg(k::text ORDER BY rn DESC))[1]")
        key_value = sql.SQL("row({})").format(keys)
    query = sql.SQL("""
        SELECT b, {ends}, count(*), sum(h) FROM (
            SELECT ntile({n}) OVER w AS b, row_number() OVER w AS rn, {key_value} AS k, {row_hash} AS h
            FROM {rel} t WINDOW w AS (ORDER BY {keys})) x
        GROUP BY b ORDER BY b""").format(ends=ends, n=sql.Literal(ranges), keys=keys, key_value=key_value,
                                         row_hash=row_hash, rel=rel)
    spans = [[first, last, int(count), str(total)] for _, first, last, count, total in db.rows(conn, query)]
    return {"rows": sum(s[2] for s in spans), "hash": str(sum(int(s[3]) for s in spans)), "key": key, "ranges": spans}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _acl(column: str, owner: str) -> str:
    """An ACL as sorted grantor>grantee:privilege items. The owner's MAINTAIN (17+) is left out: the
    owner holds it implicitly, and 17+ lists it where older majors cannot."""
    return f"""(SELECT string_agg(pg_get_userbyid(a.grantor) || '>' || CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                   ELSE pg_get_userbyid(a.grantee) END || ':' || a.privilege_type || CASE WHEN a.is_grantable
                   THEN '*' ELSE '' END, ',' ORDER BY a.grantor, a.grantee, a.privilege_type)
                FROM aclexplode({column}) a WHERE NOT (a.privilege_type = 'MAINTAIN' AND a.grantee = {owner}))"""


def schema_objects(conn) -> Dict[str, str]:
    """Each schema object by a readable name, with a hash of its normalized definition. (View
    definitions are as the server deparses them: 15 qualifies a single-table view's columns, 16+
    does not, so across majors a view can read as changed.)"""
    user = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
    queries = {
        "schema": f"SELECT n.nspname, array[pg_get_userbyid(n.nspowner), n.nspacl::text] FROM pg_namespace n WHERE {user}",
        "column": f"""SELECT n.nspname || '.' || c.relname || '.' || a.attname,
                      array[format_type(a.atttypid, a.atttypmod), a.attnotnull::text,
                            pg_get_expr(d.adbin, d.adrelid), coalesce(co.collname, ''), a.attacl::text]
                      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                      LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
                      WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {user}""",
        "relation": f"""SELECT n.nspname || '.' || c.relname, array[c.relkind::text, pg_get_userbyid(c.relowner),
                        {_acl("c.relacl", "c.relowner")}, c.relrowsecurity::text, coalesce(pg_get_viewdef(c.oid), '')]
                        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {user}""",
        # NOT NULL is the column's (attnotnull): PostgreSQL 18 also lists it here, as contype 'n'.
        "constraint": f"""SELECT n.nspname || '.' || c.relname || '.' || k.conname, array[pg_get_constraintdef(k.oid)]
                          FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype <> 'n' AND {user}""",
        "index": f"""SELECT n.nspname || '.' || c.relname, array[pg_get_indexdef(c.oid)]
                     FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {user}""",
        "function": f"""SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
                        array[p.prosrc, pg_get_function_result(p.oid), p.prokind::text, p.provolatile::text,
                              p.prosecdef::text, pg_get_userbyid(p.proowner), p.proacl::text]
                        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE {user} AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')""",
        "trigger": f"""SELECT n.nspname || '.' || c.relname || '.' || t.tgname, array[pg_get_triggerdef(t.oid)]
                       FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE NOT t.tgisinternal AND {user}""",
        "policy": f"""SELECT n.nspname || '.' || c.relname || '.' || p.polname,
                      array[p.polcmd::text, p.polpermissive::text, pg_get_expr(p.polqual, p.polrelid),
                            pg_get_expr(p.polwithcheck, p.polrelid), p.polroles::regrole[]::text]
                      FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE {user}""",
        "extension": "SELECT e.extname, array[e.extversion, n.nspname] FROM pg_extension e "
                     "JOIN pg_namespace n ON n.oid = e.extnamespace",
        "comment": f"""SELECT c.relname || coalesce('.' || a.attname, ''), array[d.description, n.nspname]
                       FROM pg_description d JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                       LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.objsubid AND d.objsubid > 0
                       WHERE {user}""",
        "default privileges": "SELECT coalesce(pg_get_userbyid(defaclrole), '') || ' ' || defaclobjtype::text, "
                              "array[defaclacl::text] FROM pg_default_acl",
    }
    found = {}
    for kind, query in queries.items():
        for name, definition in db.rows(conn, query):
            found[f"{kind} {name}"] = _digest(definition)
    return found


def take(conn, progress=None) -> dict:
    """The fingerprint of the database this connection is in, in its current snapshot."""
    prepare(conn)
    tables = {}
    for schema, name, key in _tables(conn):
        tables[f"{schema}.{name}"] = table(conn, schema, name, key)
        if progress:
            progress(f"{schema}.{name}")
    sequences = {f"{s}.{n}": [int(v), bool(c)] for s, n, v, c in _sequences(conn)}
    objects = schema_objects(conn)
    large = {str(oid): digest for oid, digest in _large_objects(conn)}
    return {"format": FORMAT, "tables": tables, "sequences": sequences, "objects": objects, "large_objects": large}


def _sequences(conn) -> List[tuple]:
    out = []
    for schema, name in db.rows(conn, """SELECT n.nspname, c.relname FROM pg_class c
                                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S'"""):
        value, called = db.rows(conn, sql.SQL("SELECT last_value, is_called FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(name)))[0]
        out.append((schema, name, value, called))
    return out


def _large_objects(conn) -> List[tuple]:
    """Each large object's md5; one this role may not read (another owner's) by its owner only."""
    return db.rows(conn, """
        SELECT m.oid, CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                                 OR pg_has_role(current_user, m.lomowner, 'USAGE')
                           THEN md5(lo_get(m.oid)) ELSE 'owner ' || pg_get_userbyid(m.lomowner) END
        FROM pg_largeobject_metadata m ORDER BY m.oid""")


def counts(fp: dict) -> Dict[str, int]:
    return {name: t["rows"] for name, t in fp.get("tables", {}).items()}


def differences(expected: dict, actual: dict, limit_ranges: int = 3) -> List[str]:
    """Every difference, named: tables (rows, content, the first differing key ranges), schema
    objects added, removed or changed, sequences moved, large objects."""
    out: List[str] = []
    want, have = expected.get("tables", {}), actual.get("tables", {})
    out += [f"table {t} is missing" for t in sorted(set(want) - set(have))]
    out += [f"table {t} is not in the rollback point" for t in sorted(set(have) - set(want))]
    for name in sorted(set(want) & set(have)):
        a, b = want[name], have[name]
        if a["rows"] == b["rows"] and a["hash"] == b["hash"]:
            continue
        text = f"table {name}: {b['rows']} rows, the point has {a['rows']}" if a["rows"] != b["rows"] else \
            f"table {name}: same {a['rows']} rows, different content"
        located = _ranges(a, b, limit_ranges)
        out.append(text + (f"; differing key ranges: {located}" if located else ""))
    for kind, label in (("sequences", "sequence"), ("large_objects", "large object")):
        w, h = expected.get(kind, {}), actual.get(kind, {})
        for name in sorted(set(w) | set(h)):
            if w.get(name) != h.get(name):
                out.append(f"{label} {name}: {_show(h.get(name))}, the point has {_show(w.get(name))}")
    w, h = expected.get("objects", {}), actual.get("objects", {})
    out += [f"{name}: added since the point" for name in sorted(set(h) - set(w))]
    out += [f"{name}: removed since the point" for name in sorted(set(w) - set(h))]
    out += [f"{name}: changed since the point" for name in sorted(set(w) & set(h)) if w[name] != h[name]]
    return out


def _show(value) -> str:
    if value is None:
        return "absent"
    if isinstance(value, list) and len(value) == 2:
        return f"at {value[0]}" + ("" if value[1] else " (not yet called)")
    return "different content"


def _ranges(a: dict, b: dict, limit: int) -> Optional[str]:
    """The point's key ranges whose rows differ (ranges are cut by position in key order, so with the
    same row count they line up; otherwise from the first range that moved on)."""
    ra, rb = a.get("ranges"), b.get("ranges")
    if not ra or not rb or a.get("key") != b.get("key"):
        return None
    found = [f"{x[0]} .. {x[1]}" for x, y in zip(ra, rb) if x != y]
    found += [f"{x[0]} .. {x[1]}" for x in ra[len(rb):]]
    if not found:
        return None
    return ", ".join(f"[{f}]" for f in found[:limit]) + (f" and {len(found) - limit} more" if len(found) > limit else "")
