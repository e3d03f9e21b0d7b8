"""Verify proves content, not counts (common/points/fingerprint.py, DESIGN §4): every change a migration
can make without changing a row count is found and named, against the point staging was restored
from, with no false alarm after any restore path."""
from __future__ import annotations

import json

import pytest

from tests import pgfixtures as pf
from tests.realistic import RealisticDatabase

# (change made as the database's owner, a part of the difference `verify` must name)
CHANGES = [
    ("UPDATE app.orders SET note = 'changed' WHERE id = 7", "table app.orders_2024: same"),
    ("UPDATE app.customers SET name = 'x' || name WHERE id IN (5, 6)", "table app.customers: same 300 rows, different content"),
    ("DELETE FROM app.audit WHERE id = (SELECT min(id) FROM app.audit); "
     "INSERT INTO app.audit (tbl, op, row_id, at) VALUES ('swapped', 'in', 1, '2025-01-01')", "table app.audit: same"),
    ("CREATE INDEX orders_note_idx ON app.orders (note)", "index app.orders_note_idx: added since the point"),
    ("ALTER TABLE app.customers ALTER COLUMN tenant SET DEFAULT 'pro'", "column app.customers.tenant: changed"),
    ("CREATE OR REPLACE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
     "function app.touch(): changed"),
    ("GRANT SELECT ON app.audit TO PUBLIC", "relation app.audit: changed"),
    ("SELECT setval('app.invoice_no', 5000)", "sequence app.invoice_no: at 5000, the point has at 1042"),
    ("SELECT lo_put((SELECT body FROM app.documents WHERE id = 2), 0, '\\x4142'::bytea)", "large object"),
    ("COMMENT ON TABLE app.orders IS 'a comment'", "comment orders: added since the point"),
]


def verify(env, *more):
    result = pf.run_script("database_rollback.py", "verify", "--json", *more, env=env)
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {"stderr": result.stderr}


@pytest.fixture
def world(server, env_for):
    with RealisticDatabase(server) as rd:
        env = env_for(server, rd.name, STAGING_DATABASE_URL=rd.url)
        made = pf.run_script("create_rollback_point.py", "A", env=env)
        assert made.returncode == 0, made.stdout + made.stderr
        yield rd, env


def test_every_change_is_found_and_named_and_a_restore_leaves_none(world):
    rd, env = world
    code, report = verify(env, "--strict")
    assert code == 0 and report["drift"] == [] and "content and schema" in report["compared"], report
    assert "never restored" in report["reference"]
    # every change at once (each touches its own object, so each is its own line of the drift)
    for change, _ in CHANGES:
        rd.as_owner(change)
    code, report = verify(env, "--strict")
    assert code == 4, report
    for change, named in CHANGES:
        assert any(named in d for d in report["drift"]), (change, report["drift"])
    quick = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert "content and schema identical to the rollback point" in quick.stdout
    code, report = verify(env, "--strict")
    assert code == 0 and report["drift"] == [], report["drift"]
    assert "last restored from" in report["reference"]
    # counts alone see none of the row changes: --quick says so
    rd.as_owner(CHANGES[0][0])
    code, report = verify(env, "--strict", "--quick")
    assert code == 0 and "row counts only" in report["compared"]


def test_every_restore_path_proves_itself_with_no_false_alarm(world, tmp_path):
    rd, env = world
    paths = [("quick_rollback.py", "--yes"), ("quick_rollback.py", "--yes", "--no-warm"),
             ("simple_rollback.py", "restore", "--yes")]
    made = pf.run_script("simple_rollback.py", "create", "snap", "--yes", env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    for command in paths:
        rd.migrate()
        result = pf.run_script(*command, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "content and schema identical" in result.stdout, result.stdout
        code, report = verify(env, "--strict")
        assert code == 0 and report["drift"] == [], (command, report)


def test_an_older_point_restored_is_verified_against_itself(world):
    rd, env = world
    rd.as_owner("INSERT INTO app.audit (tbl, op, row_id, at) SELECT 'b', 'i', i, now() FROM generate_series(1, 50) i")
    assert pf.run_script("create_rollback_point.py", "B", env=env).returncode == 0
    points = json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]
    first = next(p for p in points if p["description"] == "A")
    restored = pf.run_script("rollback_manager.py", "restore", "--file", first["id"], "--yes", env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    code, report = verify(env, "--strict")
    assert code == 0 and report["compared_with"] == first["id"], report
    for script in (("database_rollback.py", "verify", "--strict"), ("rollback_manager.py", "verify", "--strict")):
        result = pf.run_script(*script, env=env)
        assert result.returncode == 0 and first["id"] in result.stdout, result.stdout + result.stderr


def test_the_same_data_gives_the_same_fingerprint_on_both_majors(pg_old, pg_new):
    """Rows, sequences and schema objects of the same database built on the run's two majors hash
    alike: text output and catalogs are normalized (PostgreSQL 18 lists NOT NULL as constraints).
    Left out: large objects (the server assigns their OIDs, so the rows naming them differ too),
    extensions (each major ships its own contrib versions: a real difference, not a false one) and
    the view's definition text (15 qualifies a single-table view's columns, 16+ does not)."""
    from common.pg.database import connect
    from common.points import fingerprint
    from tests.realistic import available_extensions
    contrib = all({"citext", "pg_trgm"} <= set(available_extensions(s)) for s in (pg_old, pg_new))
    taken = []
    for server in (pg_old, pg_new):
        rd = RealisticDatabase(server, contrib=contrib)  # the same schema on both, whatever contrib each has
        rd.owner, rd.reader, rd.name = "fp_owner", "fp_reader", "fp_same_data"
        with rd:
            conn = connect(server.info, rd.name)
            try:  # the current format, and format 2, which points made before 2026-12-02 hold
                taken += [fingerprint.take(conn), fingerprint.take(conn, like={"format": 2})]
            finally:
                conn.close()
    assert [fp["format"] for fp in taken] == [fingerprint.FORMAT, 2] * 2
    for fp in taken:
        fp["large_objects"] = {}
        fp["tables"].pop("app.documents")
        fp["objects"] = {k: v for k, v in fp["objects"].items() if not k.startswith("extension ")
                         and k != "relation app.revenue"}  # a view: deparsed differently by 15 and 16+
    assert fingerprint.differences(taken[0], taken[2]) == [] and fingerprint.differences(taken[1], taken[3]) == []


def test_a_point_of_an_earlier_format_is_compared_in_its_own_format(pg_old):
    """A fingerprint taken like one of format 2 is taken in format 2: equal when nothing changed,
    one changed row named with its key range; the current format finds the same change."""
    from common.pg.database import connect
    from common.points import fingerprint
    name = pf.create_database(pg_old, pf.unique_name("fmt"), """
        CREATE TABLE t (id int PRIMARY KEY, label text, at timestamptz, ok boolean, n numeric);
        INSERT INTO t SELECT i, md5(i::text), '2026-01-01'::timestamptz + i * interval '1 minute', i % 2 = 0, i / 7.0
        FROM generate_series(1, 5000) i;""")
    conn = connect(pg_old.info, name)
    try:
        earlier = fingerprint.take(conn, like={"format": 2})
        now = fingerprint.take(conn, like=earlier)
        assert earlier["format"] == now["format"] == 2 and fingerprint.differences(earlier, now) == []
        current = fingerprint.take(conn)
        assert current["format"] == fingerprint.FORMAT
        assert current["tables"]["public.t"]["hash"] != earlier["tables"]["public.t"]["hash"]
        pf.execute(pg_old, name, "UPDATE t SET at = at + interval '1 microsecond' WHERE id = 4321")
        for before in (earlier, current):  # a microsecond of a timestamptz, in either format
            [line] = fingerprint.differences(before, fingerprint.take(conn, like=before))
            assert "table public.t: same 5000 rows, different content" in line, line
            low, high = line.split("differing key ranges: [")[1].split("]")[0].split(" .. ")
            assert int(low) <= 4321 <= int(high), line
    finally:
        conn.close()
        pf.drop_database(pg_old, name)


def events_line(server, env_for, first: int, last: int, change: str) -> str:
    """A table `events` keyed first..last, a point of it, the change, then verify's line for it."""
    name = pf.create_database(server, pf.unique_name("events"), f"""
        CREATE TABLE events (id bigint PRIMARY KEY, payload text);
        INSERT INTO events SELECT i, md5(i::text) FROM generate_series({first}, {last}) i;""")
    try:
        env = env_for(server, name)
        assert pf.run_script("create_rollback_point.py", "events", "--no-warm", env=env).returncode == 0
        pf.execute(server, name, change)
        code, report = verify(env, "--strict")
        assert code == 4, report
        [line] = [d for d in report["drift"] if d.startswith("table public.events")]
        return line
    finally:
        pf.drop_database(server, name)


def test_one_changed_row_in_a_million_is_located_to_its_key_range(pg_old, env_for):
    line = events_line(pg_old, env_for, 1, 1000000, "UPDATE events SET payload = 'changed' WHERE id = 654321")
    assert "same 1000000 rows, different content" in line
    low, high = line.split("differing key ranges: [")[1].split("]")[0].split(" .. ")
    assert int(low) <= 654321 <= int(high) and int(high) - int(low) < 20000, line


def test_a_key_far_beyond_the_point_s_ranges_is_named_not_an_error(pg_old, env_for):
    line = events_line(pg_old, env_for, -5000, 5000, "INSERT INTO events VALUES (9223372036854775000, 'sentinel')")
    assert "10002 rows, the point has 10001" in line and ">= " in line, line
