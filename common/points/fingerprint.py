"""A database's fingerprint: content and schema, computed by the server (DESIGN §4, "Fingerprint").

For each table, its row count and an order-independent hash of every row (the sum of a 64-bit hash
of each row, so no sort is needed); for a table with a primary key, the same per key range (up to
RANGES ranges: by value for an integer key, in one scan; by position in key order otherwise), so
that a difference can be located. Compared with another fingerprint, a table's totals are taken
first and its ranges only when they differ. Sequences (last value),
large objects (an md5 of each), and a hash per schema object: columns with their types and
defaults, constraints, indexes, views, functions, triggers, policies, grants, extensions, comments.

Row text depends on session settings, so they are fixed: UTC, ISO dates, shortest exact floats,
hex bytea. Taken in the snapshot pg_dump exports, it describes exactly what the dump holds.
Compared with `differences`, which names each table, key range, object and sequence that differs."""
from __future__ import annotations

import hashlib
import json
import queue
import threading
from typing import Dict, List, Optional, Sequence

import psycopg2.extensions
from psycopg2 import sql

from ..pg import database as db

FORMAT = 3
RANGES = 64
ROWS_PER_RANGE = 1000
SESSION = ("SET TimeZone = 'UTC'", "SET DateStyle = 'ISO, YMD'", "SET IntervalStyle = 'postgres'",
           "SET extra_float_digits = 1", "SET bytea_output = 'hex'", "SET search_path = pg_catalog",
           # compiling each scan's expressions costs more than it saves on these one-pass hashes
           "SET jit = off")
# Format 2: a row's hash is hash_record_extended over its columns, each hashed by its type's own
# 64-bit hash function (those hash partitioning uses, so stable across majors), without turning the
# row into text. Types whose equal values can differ in content (numeric 1.0 and 1.00, jsonb
# holding them, intervals of 1 day and 24 hours, text under a nondeterministic collation) and types
# without such a hash are hashed as their text. Format 1 (points made before) hashed the row's text.
_NATIVE = ("smallint", "integer", "bigint", "oid", "boolean", "real", "double precision", "text",
           "character varying", "character", "\"char\"", "name", "date", "timestamp without time zone",
           "timestamp with time zone", "time without time zone", "uuid", "bytea", "inet")
_ROW_HASH_V1 = "hashtextextended({}::text, 0)::numeric"
# Format 3 (points made since 2026-12-02): the same per-type hash functions, called on each column
# directly with the column's position as seed and combined by XOR, so the row is not formed into a
# record and taken apart again (1.2 million rows of six columns, bigint, text, float, timestamptz:
# 0.42 s instead of 0.57 s, best of five). Other types (date, boolean, bytea, numeric ...) are hashed
# as in format 2, in one hash_record_extended of those columns.
_DIRECT = {"smallint": "hashint2extended", "integer": "hashint4extended", "bigint": "hashint8extended",
           "oid": "hashoidextended", "real": "hashfloat4extended", "double precision": "hashfloat8extended",
           "text": "hashtextextended", "character varying": "hashtextextended", "character": "hashbpcharextended",
           "name": "hashnameextended", "\"char\"": "hashcharextended", "uuid": "uuid_hash_extended",
           "timestamp without time zone": "timestamp_hash_extended", "time without time zone": "time_hash_extended",
           "inet": "hashinetextended",
           # the same microseconds, as the session's time zone is UTC (SESSION)
           "timestamp with time zone": "timestamp_hash_extended"}
_CAST = {"timestamp with time zone": "timestamp"}
_INT_KEYS = ("smallint", "integer", "bigint")


def prepare(conn) -> None:
    """The session settings every fingerprint is taken with (row text must not depend on them)."""
    for statement in SESSION:
        db.execute(conn, statement)


def _tables(conn) -> List[tuple]:
    """(schema, table, primary key columns, the key's type, [(column, hashed natively, type)]) of
    every ordinary table, as db.user_tables sees them, largest first."""
    found = db.rows(conn, """
        SELECT n.nspname, c.relname,
               (SELECT array_agg(a.attname ORDER BY array_position(i.indkey::int2[], a.attnum))
                FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                WHERE i.indrelid = c.oid AND i.indisprimary),
               (SELECT format_type(a.atttypid, NULL) FROM pg_index i
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                WHERE i.indrelid = c.oid AND i.indisprimary AND i.indnkeyatts = 1),
               (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
               (SELECT array_agg(format_type(a.atttypid, NULL) = ANY(%s)
                                 AND coalesce((SELECT co.collisdeterministic FROM pg_collation co
                                               WHERE co.oid = a.attcollation), true) ORDER BY a.attnum)
                FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
               (SELECT array_agg(format_type(a.atttypid, NULL) ORDER BY a.attnum) FROM pg_attribute a
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
        ORDER BY c.relpages DESC, 1, 2""", (list(_NATIVE),))
    return [(s, t, list(k or []), ktype, list(zip(cols or [], native or [], types or [])))
            for s, t, k, ktype, cols, native, types in found]


def _row_hash(columns: List[tuple], fmt: int) -> sql.Composable:
    if fmt < 2:
        return sql.SQL(_ROW_HASH_V1).format(sql.Identifier("t"))
    if not columns:
        return sql.SQL("0::bigint")
    # as text in the C collation: a column's own nondeterministic collation would hash 'Alice' and
    # 'ALICE' alike
    direct, rest = [], []
    for position, (column, native, type_name) in enumerate(columns, 1):
        if fmt >= 3 and native and type_name in _DIRECT:
            value = sql.SQL("t.{}").format(sql.Identifier(column))
            if type_name in _CAST:
                value = sql.SQL("{}::{}").format(value, sql.SQL(_CAST[type_name]))
            direct.append(sql.SQL("coalesce({}({}, {}), {})").format(
                sql.Identifier(_DIRECT[type_name]), value, sql.Literal(position), sql.Literal(-position)))
        else:
            rest.append(sql.SQL("t.{}" if native else 't.{}::text COLLATE "C"').format(sql.Identifier(column)))
    if rest:
        direct.append(sql.SQL("hash_record_extended(ROW({}), 0)").format(sql.SQL(", ").join(rest)))
    return sql.SQL("({})").format(sql.SQL(" # ").join(direct))


def table(conn, schema: str, name: str, key: List[str], columns: List[tuple] = (), key_type: Optional[str] = None,
          fmt: int = FORMAT, like: Optional[dict] = None) -> dict:
    """Rows and content hash of one table; with a key, per key range too. `like`: the same table's
    entry in the fingerprint this one will be compared with (its key ranges are reused, so that
    the ranges line up even when rows were added or removed)."""
    rel = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))
    row_hash = _row_hash(list(columns), fmt)
    if not key or (like and "hash" in like):
        # Without a key, or when comparing: the whole table's rows and hash first (a quarter cheaper
        # than by range); ranges only for a table that differs, to locate the difference.
        count, total = db.rows(conn, sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM {} t").format(row_hash, rel))[0]
        if not key or (int(count) == like.get("rows") and str(total) == like.get("hash")):
            return {"rows": int(count), "hash": str(total)}
    if fmt >= 2 and key_type in _INT_KEYS:
        spans = _value_ranges(conn, rel, key[0], row_hash, (like or {}) if (like or {}).get("key") == key else {})
        if spans is not None:
            found, buckets = spans
            return {"rows": sum(s[3] for s in found), "hash": str(sum(int(s[4]) for s in found)), "key": key,
                    "buckets": buckets, "ranges": found}
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


def _value_ranges(conn, rel, key: str, row_hash, like: dict) -> Optional[tuple]:
    """An integer key cut into ranges of equal width by value, in one scan and no sort: [bucket,
    first key, last key, rows, hash] per range that has rows, and the cut [low, width, ranges].
    Keys below the cut fall in bucket -1, above it in bucket `ranges`. None: the key's span is too
    wide for 64-bit arithmetic (then ranges by position)."""
    k = sql.SQL("t.{}").format(sql.Identifier(key))
    cut = like.get("buckets")
    if not (isinstance(cut, list) and len(cut) == 3 and all(isinstance(x, int) for x in cut) and cut[1] > 0):
        # the key's ends from its index (no scan); the number of ranges from the span of the key
        low, high = db.rows(conn, sql.SQL("SELECT min({k}), max({k}) FROM {rel} t").format(k=k, rel=rel))[0]
        if low is None:
            return [], [0, 1, 1]
        span = int(high) - int(low) + 1
        n = max(1, min(RANGES, -(-span // ROWS_PER_RANGE)))
        cut = [int(low), max(1, -(-span // n)), n]
    low, width, n = cut
    if abs(low) >= 1 << 62 or width * (n + 1) >= 1 << 62:
        return None
    query = sql.SQL("""
        SELECT b, min(k)::text, max(k)::text, count(*), sum(h) FROM (
            SELECT CASE WHEN {k} < {low} THEN -1 WHEN {k} >= {high} THEN {n}
                        ELSE ({k}::bigint - {low}) / {width} END AS b,
                   {k} AS k, {row_hash} AS h FROM {rel} t) x
        GROUP BY b""").format(k=k, low=sql.Literal(low), high=sql.Literal(low + n * width),
                              width=sql.Literal(width), n=sql.Literal(n), row_hash=row_hash, rel=rel)
    # The planner takes every key for a group of its own (it has no statistics on the bucket), so
    # it would sort the whole table to group it; there are at most RANGES + 2 groups, which a hash
    # table holds: sorting is turned off for this query (half the time, measured on 1.2 million rows).
    db.execute(conn, "SET enable_sort = off")
    try:
        found = db.rows(conn, query)
    finally:  # not in a failed transaction: the RESET would fail too and hide the query's own error
        if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_INERROR:
            db.execute(conn, "RESET enable_sort")
    return [[int(b), first, last, int(count), str(total)] for b, first, last, count, total in sorted(found)], cut


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


def take(conn, progress=None, like: Optional[dict] = None, helpers: Sequence = ()) -> dict:
    """The fingerprint of the database this connection is in, in its current snapshot. `like`: the
    fingerprint it will be compared with (its format and key ranges are used). `helpers`: more
    connections in the same snapshot, each taking tables in parallel (largest first)."""
    fmt = int((like or {}).get("format", FORMAT))
    if like is None and int(db.scalar(conn, "SELECT current_setting('server_version_num')")) < 140000:
        fmt = 1  # hash_record_extended is PostgreSQL 14's: older servers hash each row's text
    earlier = (like or {}).get("tables", {})
    prepare(conn)
    for helper in helpers:
        prepare(helper)
    jobs: "queue.Queue" = queue.Queue()
    for job in _tables(conn):
        jobs.put(job)
    tables: Dict[str, dict] = {}
    failure: List[BaseException] = []

    def work(c) -> None:
        try:
            while not failure:
                try:
                    schema, name, key, key_type, columns = jobs.get_nowait()
                except queue.Empty:
                    return
                tables[f"{schema}.{name}"] = table(c, schema, name, key, columns, key_type, fmt,
                                                   earlier.get(f"{schema}.{name}"))
                if progress:
                    progress(f"{schema}.{name}")
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    threads = [threading.Thread(target=work, args=(h,), daemon=True) for h in helpers]
    for t in threads:
        t.start()
    work(conn)
    for t in threads:
        t.join()
    if failure:
        raise failure[0]
    tables = dict(sorted(tables.items()))
    sequences = {f"{s}.{n}": [int(v), bool(c)] for s, n, v, c in _sequences(conn)}
    objects = schema_objects(conn)
    large = {str(oid): digest for oid, digest in _large_objects(conn)}
    return {"format": fmt, "tables": tables, "sequences": sequences, "objects": objects, "large_objects": large}


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
    if ra is None or rb is None or a.get("key") != b.get("key"):
        return None
    if a.get("buckets") or b.get("buckets"):  # ranges by value, cut alike: compared bucket by bucket
        if a.get("buckets") != b.get("buckets"):
            return None
        low, width, n = a["buckets"]
        wa, wb = {x[0]: x[1:] for x in ra}, {x[0]: x[1:] for x in rb}
        found = [f"< {low}" if bucket < 0 else f">= {low + n * width}" if bucket >= n else
                 f"{low + bucket * width} .. {low + (bucket + 1) * width - 1}"
                 for bucket in sorted(set(wa) | set(wb)) if wa.get(bucket) != wb.get(bucket)]
    else:
        found = [f"{x[0]} .. {x[1]}" for x, y in zip(ra, rb) if x != y]
        found += [f"{x[0]} .. {x[1]}" for x in ra[len(rb):]]
    if not found:
        return None
    return ", ".join(f"[{f}]" for f in found[:limit]) + (f" and {len(found) - limit} more" if len(found) > limit else "")
