"""A restore, planned before its confirmation (DESIGN §5): what will be restored, how, which
sessions will be cut and which database properties set back; re-planned under the lock so the
confirmation stays true. Result: what a restore did, in words that claim only what was checked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import psycopg2

from ..errors import BackupCorrupt, RestoreFailed, UsageError
from ..log import get_logger
from ..pg import database as db
from ..pg import dbprops, frameworks
from ..pg.connections import DEFAULT_WAIT
from ..pg.database import ConnInfo
from ..pg.dbprops import DatabaseProperties
from ..pg.pgbouncer import Pooler
from ..progress import human_size
from . import catalog, snapshot, warm
from .catalog import RollbackPoint
from .fill import archive_extensions, restore_tool, verify_checksum_with_progress

RESTORE_TAG, PREVIOUS_TAG = "restore", "pre_rollback"  # <db>__restore_<ts>, <db>__pre_rollback_<ts>


@dataclass
class Plan:
    """What a restore will do, as the confirmation shows it."""

    info: ConnInfo
    point: RollbackPoint
    server_major: int
    server_version: str
    size_bytes: int
    sessions: List[db.Session]
    can_create: bool
    exists: bool
    source_text: Optional[str] = None  # set for a reset: where the fresh copy comes from
    current_props: Optional[DatabaseProperties] = None
    wanted_props: Optional[DatabaseProperties] = None
    props_note: str = ""
    wait: float = DEFAULT_WAIT
    no_warm: bool = False
    warm_reason: str = "not a dump"  # why the warm copy will not be used ('' when it will)
    pooler: Optional[Pooler] = None
    # Set by a reset that streams V2 in: fills the new database (given) and returns the row counts
    # to check it against, instead of pg_restore from the point's file.
    fill: Optional[Callable[[ConnInfo], Dict[str, int]]] = None
    fill_text: str = ""
    # With `fill`: the new database's exact row counts, taken while it was filled (None: count after)
    fill_counts: Optional[Callable[[], Optional[Dict[str, int]]]] = None
    # Set when the point was read from a sidecar in the catalog: it is read again under the lock.
    from_catalog: bool = False
    current_heads: Optional[Dict[str, str]] = None  # the target's migration heads now
    started: float = 0.0  # time.monotonic() when the restore began, under the lock
    extensions_checked: bool = False  # the dump's extensions can be created here (plan.check_extensions)

    def describe(self) -> List[str]:
        p = self.point
        lines = [f"target:         {self.info.masked()} (PostgreSQL {self.server_version}, "
                 f"{human_size(self.size_bytes) if self.exists else 'does not exist yet'})"]
        if self.source_text:
            lines.append(f"source:         {self.source_text}")
        else:
            lines += [f"rollback point: {p.id} ({p.kind}, {p.description or 'no description'}, created {p.created_at})",
                      f"                {len(p.tables)} tables, {p.rows} rows"]
            if p.last_drill and not p.last_drill.get("ok"):
                lines.append(f"WARNING:        its last drill FAILED ({str(p.last_drill.get('at'))[:19]}: "
                             f"{p.last_drill.get('error') or 'no reason recorded'}); it may not restore")
            elif p.last_drill:
                lines.append(f"                last drill OK at {str(p.last_drill.get('at'))[:19]} in "
                             f"{float(p.last_drill.get('seconds') or 0):.1f} s")
            lines += self.head_lines()
        if self.can_create:
            fill = "copy the snapshot (TEMPLATE)" if p.kind == catalog.SNAPSHOT else "restore the dump"
            if self.source_text:
                fill = "copy it"
            elif p.kind == catalog.DUMP and not self.warm_reason and not self.no_warm:
                lines.append(f"method:         swap in the sealed warm copy {p.warm_database} (renamed into place, "
                             f"nothing copied; the dump if it fails its check); the current {self.info.dbname} is "
                             f"kept as {self.info.dbname}__{PREVIOUS_TAG}_<timestamp>; then the point is re-armed "
                             "from its dump while staging serves")
                fill = ""
            elif p.kind == catalog.DUMP and p.warm_database and not self.no_warm:
                fill += f" ({self.warm_reason})"
            if fill:
                lines.append(f"method:         {fill} into a new database, check it, then swap names; the current "
                             f"{self.info.dbname} is kept as {self.info.dbname}__{PREVIOUS_TAG}_<timestamp>")
        else:
            lines.append("method:         in place, in one transaction (this role may not create databases)")
        lines += self.property_lines()
        if self.pooler is not None and self.can_create:
            lines.append(f"clients through {self.pooler.describe()}: paused, not failed, during the swap "
                         f"(at most {self.pooler.pause_timeout:.0f} s)")
        elif self.pooler is not None:
            lines.append(f"clients through {self.pooler.describe()}: not paused (an in-place restore takes "
                         "too long to hold them); they see errors until it ends")
        if self.sessions:
            lines.append(f"connections that will be cut ({len(self.sessions)}):")
            lines += [f"  {s.describe()}" for s in self.sessions]
        else:
            lines.append("connections that will be cut: none")
        return lines


    def head_lines(self) -> List[str]:
        """Each framework's migration head now and after the restore."""
        after = self.point.migration_heads or ({frameworks.TOOLKIT: self.point.migration_head}
                                               if self.point.migration_head else {})
        now = self.current_heads or {}
        if not after and not now:
            return ["migration heads: none recorded (no migration tracking table)"]
        missing = "(unknown: could not be read)" if self.exists and self.current_heads is None else "(none)"
        lines = []
        for name in list(now) + [n for n in after if n not in now]:
            a, b = now.get(name, missing), after.get(name, "(none)")
            if name == "django" and a != b and a != missing:  # app by app: 'shop 0003_x -> shop 0001_initial'
                apps_now, apps_after = _django_apps(a), _django_apps(b)
                for app in sorted(set(apps_now) | set(apps_after)):
                    x, y = apps_now.get(app, "(none)"), apps_after.get(app, "(none)")
                    if x != y:
                        lines.append(f"  django {app}: {x} -> {y}")
                continue
            lines.append(f"  {name}: {a} (unchanged)" if a == b else f"  {name}: {a} -> {b}")
        return ["migration heads, now -> after the restore:"] + lines

    def property_lines(self) -> List[str]:
        if self.props_note:
            return [f"database properties: {self.props_note}"]
        changes = dbprops.describe_changes(self.current_props, self.wanted_props) if self.wanted_props else []
        if not changes:
            return ["database properties: owner, ACL, comment, settings as at the rollback point (unchanged)"]
        return [f"database properties that will change ({len(changes)}), back to the rollback point's:"] + \
            [f"  {line}" for line in changes]


@dataclass
class Result:
    target: str
    point: RollbackPoint
    method: str
    kept_as: Optional[str] = None
    seconds: float = 0.0
    unavailable_seconds: float = 0.0
    sessions_cut: int = 0
    tables_checked: int = 0
    rows_checked: int = 0
    notes: List[str] = field(default_factory=list)
    headline: Optional[str] = None
    paused_seconds: Optional[float] = None
    reference: str = "the rollback point"
    # Steps after the renames had committed that did not finish: the target is restored all the same.
    unfinished: List[str] = field(default_factory=list)
    dropped_replaced: List[str] = field(default_factory=list)  # older replaced databases dropped (retention)
    objects_checked: int = 0
    proof: str = "counts"  # "fingerprint": content and schema compared; "sealed": the seal proves it; "counts"
    back_seconds: Optional[float] = None  # from the start, under the lock, until the target was the restored one
    rearm: bool = False  # the point's warm copy was swapped in: it is to be re-armed
    rearmed: Optional[object] = None  # warm.Rearmed, once a re-arm ran
    services: Optional[object] = None  # common.services.Services, when its commands ran
    taken_from: Optional[str] = None  # the warm copy's name, when this restore took it

    def summary_lines(self) -> List[str]:
        p = self.point
        lines = [self.headline or f"Restored {self.target} from rollback point {p.id} ({p.description or 'no description'}).",
                 f"  method:       {self.method}",
                 f"  took:         {self.took()}; {self.target} was unavailable for "
                 f"{self.unavailable_seconds * 1000:.0f} ms",
                 f"  verification: {self.verification()}",
                 f"  connections cut: {self.sessions_cut}"]
        if self.paused_seconds is not None:
            lines.append(f"  PgBouncer:    clients paused for {self.paused_seconds * 1000:.0f} ms, then resumed "
                         "against the restored database")
        if self.rearmed is not None:
            lines.append(f"  warm again:   {self.rearm_text()}")
        if self.services is not None:
            lines += [f"  {line}" for line in self.services.lines()]
        if self.kept_as:
            lines.append(f"  previous state kept as database {self.kept_as!r} "
                         "(remove with cleanup, or restore it by renaming if this rollback was wrong)")
        if self.dropped_replaced:
            lines.append(f"  older replaced databases dropped (ROLLBACK_KEEP_REPLACED): {', '.join(self.dropped_replaced)}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {self.target} IS restored, but this did not finish: {u}" for u in self.unfinished]
        return lines

    def took(self) -> str:
        if self.back_seconds is None:
            return f"{self.seconds:.1f} s"
        return (f"{self.target} served the restored database after {self.back_seconds:.2f} s "
                f"({self.seconds:.2f} s in all)")

    def rearm_text(self) -> str:
        r = self.rearmed
        if r.ok:
            return (f"yes, after {self.seconds + r.seconds:.1f} s ({r.seconds:.1f} s re-arming from the dump while "
                    f"{self.target} served: {r.note})")
        return f"NO ({r.note})"

    def verification(self) -> str:
        what = f"{self.tables_checked} tables, {self.rows_checked} rows, {self.objects_checked} schema objects"
        if self.proof == "fingerprint":
            return f"OK, content and schema identical to {self.reference}: {what} (row hashes and definitions compared)"
        if self.proof == "sealed" and self.objects_checked:
            return (f"OK, content and schema identical to {self.reference}: {what} (checked against its fingerprint "
                    "when sealed; nobody can have changed it since)")
        return (f"OK, {self.tables_checked} tables and {self.rows_checked} rows match {self.reference} (row counts "
                "only: it records no fingerprint)")

    def to_json(self) -> dict:
        return {"target": self.target, "point": self.point.id, "method": self.method, "kept_as": self.kept_as,
                "proof": self.proof, "objects_checked": self.objects_checked,
                "seconds": round(self.seconds, 3),
                "back_seconds": None if self.back_seconds is None else round(self.back_seconds, 3),
                "warm_again": None if self.rearmed is None else self.rearmed.ok,
                "warm_again_seconds": (round(self.seconds + self.rearmed.seconds, 3)
                                       if self.rearmed is not None and self.rearmed.ok else None),
                "rearm": None if self.rearmed is None else self.rearmed.note,
                "services": None if self.services is None else self.services.to_json(),
                "unavailable_seconds": round(self.unavailable_seconds, 4),
                "sessions_cut": self.sessions_cut, "tables_checked": self.tables_checked,
                "rows_checked": self.rows_checked, "verified": True, "notes": self.notes,
                "restored": True, "unfinished": self.unfinished, "dropped_replaced": self.dropped_replaced,
                "pgbouncer_paused_seconds": None if self.paused_seconds is None else round(self.paused_seconds, 4)}


def plan(info: ConnInfo, point: RollbackPoint, *, pg_bin_dir: Optional[str] = None, force: bool = False,
         check_backup: bool = True, source_text: Optional[str] = None, pooler: Optional[Pooler] = None,
         no_warm: bool = False) -> Plan:
    """Everything checked before anything changes: the backup whole, the target the right one,
    a pg_restore that can do the job."""
    if point.database and point.database != info.dbname and not force:
        raise UsageError(f"rollback point {point.id} is a backup of database {point.database!r}, not "
                         f"{info.dbname!r}. Nothing was changed. Pass --force to restore it anyway.")
    if check_backup and point.kind == catalog.DUMP:
        catalog.quick_check(point)
        if point.status != catalog.OK:
            raise BackupCorrupt(f"rollback point {point.id} is {point.status}: {point.problem}. Nothing was changed.")
    conn = db.maintenance_db(info)
    try:
        major, version = db.server_version(conn)
        exists = db.database_exists(conn, info.dbname)
        the_plan = Plan(info, point, major, version,
                        db.database_size(conn, info.dbname) if exists else 0,
                        db.sessions(conn, info.dbname) if exists else [],
                        db.can_create_databases(conn), exists, source_text=source_text, pooler=pooler)
        the_plan.from_catalog = point.folder is not None and point.sidecar.exists()
        snapshot_present = point.kind != catalog.SNAPSHOT or db.database_exists(conn, point.snapshot_database)
        if point.kind == catalog.SNAPSHOT and snapshot_present and not snapshot.proven_ours(conn, point):
            raise BackupCorrupt(snapshot.not_ours(point))
        _plan_properties(conn, the_plan)
        the_plan.no_warm = no_warm
        if point.kind == catalog.DUMP:
            the_plan.warm_reason = warm_reason(conn, the_plan)
        if point.kind == catalog.DUMP and point.path is not None:
            tool = restore_tool(point, major, pg_bin_dir)  # fail now, not after the confirmation
            if the_plan.warm_reason or no_warm or not the_plan.can_create:  # a swapped-in copy creates none
                check_extensions(conn, the_plan, pg_bin_dir, tool)
    finally:
        conn.close()
    if exists:
        the_plan.current_heads = heads_of(info)
    if pooler is not None:
        pooler.check()  # a configured PgBouncer that does not answer is refused now, not mid-swap
    if point.kind == catalog.DUMP:
        if check_backup and not the_plan.can_create:
            verify_checksum_with_progress(point)  # in place touches the target at once: check first
    elif point.kind == catalog.SNAPSHOT:
        if not the_plan.can_create:
            raise snapshot.SnapshotFailed(f"restoring a snapshot needs the CREATEDB privilege, which role "
                                          f"{info.user or '(default)'} lacks. Nothing was changed.")
        if not snapshot_present:
            raise BackupCorrupt(f"snapshot {point.id} is MISSING: database {point.snapshot_database!r} does "
                                "not exist. Nothing was changed.")
    return the_plan


def _django_apps(head: str) -> Dict[str, str]:
    """'auth 0012_x, shop 0001_initial' -> {'auth': '0012_x', 'shop': '0001_initial'}."""
    return dict(part.strip().split(" ", 1) for part in head.split(",") if " " in part.strip())


def heads_of(info: ConnInfo) -> Optional[Dict[str, str]]:
    """The target's migration heads, for the confirmation (None when it cannot be read)."""
    try:
        conn = db.connect(info)
    except Exception:  # e.g. connections not allowed: the confirmation says the heads are unknown
        return None
    try:
        return frameworks.heads(conn)
    except psycopg2.Error:
        return None
    finally:
        conn.close()


def refresh(the_plan: Plan, conn) -> List[str]:
    """Read again, under the lock, what the confirmation showed and the restore will use: the point
    (its sidecar), the target's properties and the warm copy's state; returns what changed since.
    A run that waited at its prompt must not set back properties, or use a point, as they were."""
    info, point = the_plan.info, the_plan.point
    changed = []
    if the_plan.from_catalog:
        try:
            now = catalog.load_sidecar(point.sidecar)
        except (OSError, ValueError):
            raise RestoreFailed(f"rollback point {point.id} was deleted or changed since the confirmation. Nothing "
                                "was changed; run the command again.") from None
        if (now.kind, now.file, now.sha256, now.size_bytes, now.snapshot_database, now.tables) != \
                (point.kind, point.file, point.sha256, point.size_bytes, point.snapshot_database, point.tables):
            raise RestoreFailed(f"rollback point {point.id} was changed since the confirmation. Nothing was changed; "
                                "run the command again.")
        if now.database_properties != point.database_properties:
            changed.append("the rollback point's recorded database properties")
        now.status, now.problem = point.status, point.problem
        the_plan.point = point = now
    props = lambda: [p.to_json() if p else None for p in (the_plan.current_props, the_plan.wanted_props)]  # noqa: E731
    shown = props()
    the_plan.exists = db.database_exists(conn, info.dbname)
    the_plan.size_bytes = db.database_size(conn, info.dbname) if the_plan.exists else 0
    the_plan.sessions = db.sessions(conn, info.dbname) if the_plan.exists else []
    _plan_properties(conn, the_plan)
    if props() != shown:
        changed.append(f"the properties of {info.dbname} (another run changed them while this one waited)")
    if point.kind == catalog.DUMP:
        the_plan.warm_reason = warm_reason(conn, the_plan)
    return changed


def warm_reason(conn, the_plan: Plan) -> str:
    """Why the point's warm copy will not be swapped in ('' when it will)."""
    point, wanted = the_plan.point, the_plan.wanted_props
    why = warm.unusable(conn, point)
    if not why and wanted is not None:
        there = dbprops.read(conn, point.warm_database)
        if there is not None and there.tablespace != wanted.tablespace:  # a rename cannot move it
            why = (f"its warm copy is in tablespace {there.tablespace or 'pg_default'}, the point's database in "
                   f"{wanted.tablespace or 'pg_default'}")
    return why


def _plan_properties(conn, the_plan: Plan) -> None:
    """Which database-level properties the restored database gets, and a check, on the current
    target in a transaction that is rolled back, that this role may set every one of them."""
    info, point = the_plan.info, the_plan.point
    current = dbprops.read(conn, info.dbname) if the_plan.exists else None
    wanted = dbprops.DatabaseProperties.from_json(point.database_properties)
    the_plan.current_props = current
    if wanted is None and current is not None:
        wanted = current
        the_plan.props_note = (f"{info.dbname} keeps its own (owner, ACL, comment, settings)" if the_plan.source_text
                               else f"the rollback point records none (made before they were recorded): "
                                    f"{info.dbname} keeps its current owner, ACL, comment and settings")
    if wanted is None and current is None and the_plan.source_text:  # a reset into a database not made yet
        the_plan.props_note = (f"{info.dbname} does not exist yet: it is made with its server's defaults (the reset "
                               "copies V2's schema and rows, not V2's database properties)")
    the_plan.wanted_props = wanted
    if wanted is None or current is None:
        return
    if the_plan.can_create:
        # The new database starts as CREATE DATABASE leaves it, owned by the recorded owner; to learn
        # whether this role may make it so, the same statements run here first, and are undone.
        me = db.scalar(conn, "SELECT current_user")
        start = dbprops.blank(me, wanted.tablespace)
        dbprops.check_settable(conn, info.dbname, start, wanted)
    else:
        dbprops.check_settable(conn, info.dbname, current, wanted)


def check_extensions(conn, the_plan: "Plan", pg_bin_dir: Optional[str], tool=None) -> None:
    """Every extension the dump creates can be created by this role here (pg_restore --list), once."""
    if the_plan.extensions_checked:
        return
    point = the_plan.point
    names = archive_extensions(tool or restore_tool(point, the_plan.server_major, pg_bin_dir), point)
    problems = dbprops.uncreatable_extensions(conn, names)
    the_plan.extensions_checked = not problems
    if problems:
        me = db.scalar(conn, "SELECT current_user")
        listed = "; ".join(f"{name}: {why}" for name, why in problems)
        raise RestoreFailed(f"the rollback point has extension(s) that role {me} cannot create on this server "
                            f"({listed}). Nothing was changed. Run the restore as a superuser, or have a "
                            "superuser install the extension's files (for one that is missing).")


def property_notes(the_plan: Plan) -> List[str]:
    if the_plan.props_note:
        return [f"database properties: {the_plan.props_note}"]
    if the_plan.wanted_props is None:
        return []
    changed = dbprops.describe_changes(the_plan.current_props, the_plan.wanted_props)
    for line in changed:
        get_logger().debug("database property set back: %s", line)
    return [f"database properties: as at the rollback point ({len(changed)} changed back, as listed before "
            "the confirmation), and checked after setting them" if changed else
            "database properties: as at the rollback point (unchanged)"]
