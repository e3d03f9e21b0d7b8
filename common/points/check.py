"""A database checked against its rollback point (DESIGN §4, §5): content and schema by the point's
fingerprint, or tables and row counts for a point made before fingerprints. Used by every restore
path before its swap, by the warm copy's seal and by verify."""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

from ..errors import RestoreFailed
from ..pg import database as db
from ..pg.database import ConnInfo
from . import fingerprint
from .catalog import RollbackPoint


def check_against_point(target: ConnInfo, point: RollbackPoint, opened: Sequence = ()) -> tuple:
    """The new database against the point, refused (target untouched) when it differs; returns
    (tables, rows, objects) checked. See compare_with_point."""
    problems, checked = compare_with_point(target, point, opened)
    if problems:
        raise RestoreFailed(f"the restored copy differs from the rollback point in {len(problems)} place(s) (" +
                            "; ".join(problems[:5]) + "). The target was not touched.")
    return checked


def compare_with_point(target: ConnInfo, point: RollbackPoint, opened: Sequence = ()) -> tuple:
    """With a fingerprint, content and schema (every row's hash, every object's definition,
    sequences, large objects); a point made before has its tables and row counts only. Returns
    (differences, (tables, rows, objects)). The database is analysed alongside (pg_restore leaves
    it without planner statistics). `opened`: connections to use, for a sealed copy."""
    if not point.fingerprint:
        counts = db.count_rows_parallel(target, workers=2, analyze=True, opened=opened)
        return diff_counts(point.tables, counts), (len(counts), sum(counts.values()), 0)
    actual = fingerprint_of(target, opened, analyze=True, like=point.fingerprint)
    return (fingerprint.differences(point.fingerprint, actual),
            (len(actual["tables"]), sum(fingerprint.counts(actual).values()), len(actual["objects"])))


def fingerprint_of(target: ConnInfo, opened: Sequence = (), analyze: bool = False, like: Optional[dict] = None,
                   workers: int = 2) -> dict:
    """The fingerprint of a database, taken by `workers` connections in one snapshot, with an ANALYZE
    beside it on one more. `like`: the fingerprint it is compared with (format, key ranges).
    `opened` (a sealed copy, which takes no new connection): the first takes it, the second analyses."""
    conns = list(opened) or [db.connect(target) for _ in range(workers + (1 if analyze else 0))]
    takers = conns[:1] if opened else conns[:workers]
    failure: List[BaseException] = []

    def run_analyze() -> None:
        try:
            db.execute(conns[len(takers)], "ANALYZE")
        except BaseException as exc:  # re-raised below
            failure.append(exc)

    worker = threading.Thread(target=run_analyze, daemon=True) if analyze and len(conns) > len(takers) else None
    try:
        if worker:
            worker.start()
        if len(takers) > 1:  # one snapshot for all: the database may be in use (verify)
            db.execute(takers[0], "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snapshot_id = db.scalar(takers[0], "SELECT pg_export_snapshot()")
            for helper in takers[1:]:
                db.execute(helper, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                db.execute(helper, "SET TRANSACTION SNAPSHOT %s", (snapshot_id,))
        taken = fingerprint.take(takers[0], like=like, helpers=takers[1:])
        if worker:
            worker.join()
    finally:
        for c in conns:
            if not c.closed:
                c.close()
    if failure:
        raise failure[0]
    return taken


def diff_counts(expected: Dict[str, int], actual: Dict[str, int]) -> List[str]:
    problems = [f"table {t} missing" for t in sorted(set(expected) - set(actual))]
    problems += [f"table {t} not in the rollback point" for t in sorted(set(actual) - set(expected))]
    problems += [f"{t}: {actual[t]} rows, expected {expected[t]}" for t in sorted(set(expected) & set(actual))
                 if expected[t] != actual[t]]
    return problems
