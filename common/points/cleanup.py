"""Removing old rollback points and kept databases; the newest OK point of each database stays."""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import List, Optional

from ..log import get_logger
from ..pg import database as db
from . import catalog, snapshot, warm
from .catalog import RollbackPoint
from .plan import PREVIOUS_TAG

_STAMP = re.compile(r"(\d{8}_\d{6})(?:_\d{3})?$")


@dataclass
class CleanupPlan:
    points: List[RollbackPoint] = field(default_factory=list)
    databases: List[str] = field(default_factory=list)
    kept: List[RollbackPoint] = field(default_factory=list)
    releases: list = field(default_factory=list)

    def lines(self) -> List[str]:
        """What will be destroyed, by name: files, folders and databases, not only ids."""
        out = [f"release {r.id} ({r.description or '-'}, created {r.created_at}): its document {r.sidecar}, the "
               f"folders {r.parts['config']['path']} and {r.parts['code']['path']}, and its database point"
               for r in self.releases]
        for p in self.points:
            doomed = [str(f) for f in _files_of(p)]
            doomed += [f"database {d}" for d in (p.snapshot_database, p.warm_database) if d]
            out.append(f"rollback point {p.id} ({p.kind}, {p.status}, created {p.created_at}, "
                       f"{p.description or '-'}): {', '.join(doomed) or 'nothing on disk'}")
        out += [f"database {name}" for name in self.databases]
        return out or ["nothing"]


def _files_of(point: RollbackPoint) -> List:
    if point.status == catalog.INVALID:
        return [point.listed_file] if point.listed_file else []
    found = [point.sidecar] if point.status != catalog.INCOMPLETE else []
    return found + ([point.path] if point.path else [])


def plan_points(points: List[RollbackPoint], older_than_days: Optional[float], keep: Optional[int],
                now: Optional[float] = None) -> CleanupPlan:
    """Points past the age (or beyond the newest `keep` of their database) go; the newest OK point
    of every database always stays."""
    plan = CleanupPlan()
    seen_ok: dict = {}
    for point in points:  # newest first
        key = point.database
        rank = seen_ok.get(key, 0)
        is_ok = point.status == catalog.OK
        protected = is_ok and rank == 0
        if is_ok:
            seen_ok[key] = rank + 1
        old = older_than_days is not None and catalog.age_days(point, now) > older_than_days
        surplus = keep is not None and is_ok and rank >= keep
        if not protected and (old or surplus):
            plan.points.append(point)
        else:
            plan.kept.append(point)
    return plan


def plan_releases(plan: CleanupPlan, releases: list, older_than_days: Optional[float],
                  now: Optional[float] = None) -> None:
    """A release goes with its three parts, when it is past the age or its database point goes; the
    newest OK release and its parts always stay."""
    newest_ok = next((r for r in releases if r.status == catalog.OK), None)
    if newest_ok is not None:
        keep_id = newest_ok.parts["database"]["id"]
        plan.kept += [p for p in plan.points if p.id == keep_id]
        plan.points = [p for p in plan.points if p.id != keep_id]
    going = {p.id for p in plan.points}
    by_id = {p.id: p for p in plan.kept}
    for r in releases:
        if r is newest_ok or r.status == catalog.INVALID:  # an INVALID document is listed, never acted on
            continue
        old = older_than_days is not None and catalog.age_days(r, now) > older_than_days
        if old or r.parts["database"]["id"] in going:
            plan.releases.append(r)
            point = by_id.get(r.parts["database"]["id"])
            if point is not None and not _newest_ok_of_its_database(point, plan):
                plan.kept.remove(point)
                plan.points.append(point)


def _newest_ok_of_its_database(point: RollbackPoint, plan: CleanupPlan) -> bool:
    ok = [p for p in plan.kept if p.database == point.database and p.status == catalog.OK]
    return bool(ok) and ok[0] is point


def kept_databases(conn, target: str, older_than_days: Optional[float], now: Optional[float] = None) -> List[str]:
    """`<target>__pre_rollback_<ts>` databases past the age."""
    if older_than_days is None:
        return []
    now = now or time.time()
    found = []
    for name in db.databases_like(conn, db.name_prefix(target, PREVIOUS_TAG)):
        match = _STAMP.search(name)
        if not match:
            continue
        created = datetime.strptime(match.group(1), "%Y%m%d_%H%M%S").timestamp()
        if (now - created) / 86400 > older_than_days:
            found.append(name)
    return found


def remove(plan: CleanupPlan, conn=None) -> List[str]:
    done = []
    for r in plan.releases:  # the sidecar first: a release is never listed with a part gone
        r.sidecar.unlink(missing_ok=True)
        for part in ("config", "code"):
            shutil.rmtree(r.parts[part]["path"], ignore_errors=True)
        done.append(f"release {r.id} (its configuration and code backups)")
    for point in plan.points:
        if point.kind == catalog.SNAPSHOT:
            if conn is None:
                get_logger().warning("skipping snapshot %s: no connection to its server", point.id)
                continue
            snapshot.drop(conn, point)
        catalog.remove_files(point)
        if point.warm_database and conn is not None:
            warm.drop(conn, point)
        extra = point.snapshot_database or (point.warm_database if conn is not None else None)
        done.append(f"rollback point {point.id}" + (f" (database {extra})" if extra else ""))
    for name in plan.databases:
        db.drop_database(conn, name)
        done.append(f"database {name}")
    return done
