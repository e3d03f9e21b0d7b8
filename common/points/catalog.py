"""The rollback-point catalog: backups in $BACKUP_DIR and their JSON sidecars (DESIGN §4)."""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .. import trust
from ..errors import BackupCorrupt, UsageError
from ..storage import fsync_dir, slug, utc_now, write_json_atomic

FORMAT_VERSION = 1
OK, CORRUPT, MISSING, INCOMPLETE, INVALID = "OK", "CORRUPT", "MISSING", "INCOMPLETE", "INVALID"
UNRESTORABLE = "UNRESTORABLE"  # whole and checksummed, but nothing on this machine can restore it
UNKNOWN = "UNKNOWN"  # a server-side item while its server cannot be reached
DUMP, SNAPSHOT = "dump", "snapshot"
_REQUIRED = ("format_version", "id", "kind", "database", "created_at")


@dataclass
class RollbackPoint:
    """One rollback point as its sidecar records it, plus its status as last checked."""

    id: str
    kind: str = DUMP
    database: str = ""
    description: str = ""
    created_at: str = ""
    source_url: str = ""
    server_version: str = ""
    method: str = ""
    tool: str = ""
    tool_version: str = ""
    compression: str = ""
    file: Optional[str] = None
    snapshot_database: Optional[str] = None
    size_bytes: int = 0
    sha256: Optional[str] = None
    tables: Dict[str, int] = field(default_factory=dict)
    migration_head: Optional[str] = None  # the toolkit's own schema_migrations
    # Every framework's head (common.pg.frameworks): {'django': 'shop 0001_initial', ...}
    migration_heads: Optional[Dict[str, str]] = None
    # The commit at REPO_PATH when the point was made (the code that expected this database)
    code_commit: Optional[str] = None
    duration_seconds: float = 0.0
    # Owner, ACL, comment, settings... of the database (common.pg.dbprops); None in points made before.
    database_properties: Optional[dict] = None
    # The sealed warm copy of a dump point (common.points.warm): its database, OID and pg_database xmin.
    warm_database: Optional[str] = None
    warm_oid: Optional[int] = None
    warm_xmin: Optional[str] = None
    warm_size_bytes: Optional[int] = None
    warm_dump_key: Optional[str] = None  # the dump as it was when the copy was sealed (warm.dump_key)
    # Set when restoring the dump failed (its warm copy could not be built from it): the point is not OK.
    restore_problem: Optional[str] = None
    # Content and schema, taken in the dump's snapshot (common.points.fingerprint); None in points made before.
    fingerprint: Optional[dict] = None
    format_version: int = FORMAT_VERSION
    # The last drill (common.points.drill): {at, ok, seconds, tools, error}; None when never drilled.
    last_drill: Optional[dict] = None
    # Not stored: where the catalog found it and what the last check said.
    folder: Optional[Path] = field(default=None, repr=False, compare=False)
    status: str = OK
    problem: str = ""
    listed_file: Optional[Path] = field(default=None, repr=False, compare=False)  # an INVALID item's own file
    restore_with: str = field(default="", repr=False, compare=False)  # the tools that will restore it, as checked
    timings: dict = field(default_factory=dict, repr=False, compare=False)  # this run's parts, for its summary

    @property
    def path(self) -> Optional[Path]:
        """The backup file (dump kind)."""
        return self.folder / self.file if (self.folder and self.file) else None

    @property
    def sidecar(self) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.id}.json"

    @property
    def rows(self) -> int:
        return sum(self.tables.values())

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("folder", "status", "problem", "listed_file", "restore_with", "timings")}
        return data

    def summary(self) -> dict:
        """What `list --json` and `info --json` print: the sidecar plus status and paths."""
        data = self.to_json()
        data.update(status=self.status, problem=self.problem, warm=bool(self.warm_database),
                    drill_failed=bool(self.last_drill) and not self.last_drill.get("ok"),
                    restore_with=self.restore_with or None,
                    path=str(self.path) if self.path else None,
                    sidecar=str(self.sidecar) if self.folder else None)
        return data


def new_id(folder: Path, database: str, description: str = "", now: Optional[datetime] = None) -> str:
    """`<db>_<YYYYmmdd_HHMMSS>[_<slug>]`, unique in the folder even for two points in one second."""
    when = (now or utc_now()).astimezone().strftime("%Y%m%d_%H%M%S")
    base = f"{slug(database)}_{when}" + (f"_{slug(description)}" if description.strip() else "")
    candidate, n = base, 1
    while any((folder / f"{candidate}{ext}").exists() for ext in (".json", ".dump", ".dump.partial", ".json.partial")):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def save(point: RollbackPoint) -> None:
    """Write the sidecar: the last step of creating a point, so a point without one is never offered."""
    write_json_atomic(point.sidecar, point.to_json())


def load_sidecar(path: Path) -> RollbackPoint:
    """A point from its sidecar; raises ValueError saying why when the sidecar is not one this
    toolkit could have written: every field is checked before anything uses it (DESIGN §3)."""
    data = trust.read_json(path)
    if not isinstance(data, dict) or any(k not in data for k in _REQUIRED):
        raise ValueError("sidecar lacks required fields")
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(f"unknown sidecar format_version {data['format_version']!r}")
    if data["id"] != path.stem:
        raise ValueError(f"sidecar id {data['id']!r} does not match its file name")
    known = {f.name for f in fields(RollbackPoint)}
    point = RollbackPoint(**{k: v for k, v in data.items() if k in known})
    point.folder = path.parent
    _validate(point)
    return point


_STRINGS = ("id", "kind", "database", "description", "created_at", "source_url", "server_version", "method", "tool",
            "tool_version", "compression")
_DERIVED = re.compile(r"^\d{8}_\d{6}_\d{3}$")  # catalog.stamp()


def _validate(point: RollbackPoint) -> None:
    """Types, names and paths of a sidecar: a bad one makes its point INVALID, never an action."""
    from ..pg.database import name_prefix  # database imports nothing of the catalog's; kept local all the same
    for name in _STRINGS:
        if not isinstance(getattr(point, name), str):
            raise ValueError(f"{name} must be text")
    if point.kind not in (DUMP, SNAPSHOT):
        raise ValueError(f"unknown kind {point.kind!r}")
    if not point.database or "\x00" in point.database:
        raise ValueError("it names no database")
    try:
        datetime.fromisoformat(point.created_at)
    except ValueError:
        raise ValueError(f"created_at {point.created_at!r} is not a date") from None
    for name in ("size_bytes", "warm_oid", "warm_size_bytes", "format_version"):
        value = getattr(point, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a whole number")
    if isinstance(point.duration_seconds, bool) or not isinstance(point.duration_seconds, (int, float)):
        raise ValueError("duration_seconds must be a number")
    if not isinstance(point.tables, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in point.tables.items()):
        raise ValueError("tables must map table names to row counts")
    for name in ("sha256", "migration_head", "warm_xmin", "warm_dump_key", "file", "snapshot_database",
                 "warm_database", "restore_problem", "code_commit"):
        if getattr(point, name) is not None and not isinstance(getattr(point, name), str):
            raise ValueError(f"{name} must be text")
    if point.migration_heads is not None and not (isinstance(point.migration_heads, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in point.migration_heads.items())):
        raise ValueError("migration_heads must map frameworks to their heads")
    if point.database_properties is not None and not isinstance(point.database_properties, dict):
        raise ValueError("database_properties must be an object")
    if point.last_drill is not None and not _valid_drill(point.last_drill):
        raise ValueError("last_drill must be {at, ok, seconds, tools, error}")
    if point.fingerprint is not None and not (isinstance(point.fingerprint, dict)
                                              and isinstance(point.fingerprint.get("tables"), dict)):
        raise ValueError("fingerprint must be an object with tables")
    if point.kind == DUMP:
        if point.file != f"{point.id}.dump":
            raise ValueError(f"file {point.file!r} is not the point's own {point.id}.dump in its folder")
        trust.inside(point.folder, point.file, "file")
        if not isinstance(point.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", point.sha256):
            raise ValueError("sha256 is not a checksum")
        if point.snapshot_database is not None:
            raise ValueError("a dump point names a snapshot database")
    elif point.file is not None or point.warm_database is not None:
        raise ValueError("a snapshot point names a file or a warm copy")
    # Databases the point names must be the toolkit's own names derived from its database: a
    # sidecar can never make the toolkit touch V2, or any database it did not make.
    for name, tag, sep in (("warm_database", "warm", "__"), ("snapshot_database", "snap", "_")):
        value = getattr(point, name)
        if value is None:
            if name == "snapshot_database" and point.kind == SNAPSHOT:
                raise ValueError("a snapshot point names no snapshot database")
            continue
        prefix = name_prefix(point.database, tag, sep)
        if not value.startswith(prefix) or not _DERIVED.match(value[len(prefix):]):
            raise ValueError(f"{name} {value!r} is not a name this toolkit derives from {point.database!r} "
                             f"({prefix}<timestamp>)")


def _valid_drill(d) -> bool:
    return (isinstance(d, dict) and isinstance(d.get("at"), str) and isinstance(d.get("ok"), bool)
            and isinstance(d.get("seconds"), (int, float)) and not isinstance(d.get("seconds"), bool)
            and isinstance(d.get("tools"), str) and (d.get("error") is None or isinstance(d.get("error"), str)))


def quick_check(point: RollbackPoint, snapshot_exists: Optional[Callable[[str], Optional[bool]]] = None) -> RollbackPoint:
    """Cheap status for `list`: the file or snapshot database present, the size as recorded."""
    point.status, point.problem = OK, ""
    if point.kind == SNAPSHOT:
        exists = snapshot_exists(point.snapshot_database) if snapshot_exists else None
        if exists is False:
            point.status, point.problem = MISSING, f"snapshot database {point.snapshot_database!r} does not exist"
        elif exists is None and snapshot_exists is not None:
            point.status, point.problem = UNKNOWN, "its server cannot be reached"
        return point
    path = point.path
    if path is None or not path.exists():
        point.status, point.problem = MISSING, f"backup file {point.file} is missing"
    elif point.restore_problem:
        point.status, point.problem = UNRESTORABLE, point.restore_problem
    elif path.stat().st_size != point.size_bytes:
        point.status = CORRUPT
        point.problem = f"size is {path.stat().st_size} bytes, the sidecar says {point.size_bytes}"
    return point


def scan(folder: Path, snapshot_exists: Optional[Callable[[str], Optional[bool]]] = None) -> List[RollbackPoint]:
    """Every point in the folder, newest first, with its cheap status; dumps without a valid
    sidecar (and leftovers of interrupted backups) are listed as INCOMPLETE."""
    if not folder.is_dir():
        return []
    points: List[RollbackPoint] = []
    claimed = set()
    for sidecar in folder.glob("*.json"):
        if sidecar.name.startswith("."):  # the toolkit's own markers (an in-flight restore), not points
            continue
        try:
            point = load_sidecar(sidecar)
        except (ValueError, TypeError, OSError) as exc:
            points.append(_invalid(sidecar, f"sidecar not used: {exc}"))
            claimed.add(sidecar.stem + ".dump")
            continue
        if point.file:
            claimed.add(point.file)
        points.append(quick_check(point, snapshot_exists))
    for leftover in list(folder.glob("*.dump")) + list(folder.glob("*.partial")):
        if leftover.name in claimed or leftover.name.endswith(".json.partial") or leftover.name.startswith("."):
            continue
        if leftover.is_symlink():
            points.append(_invalid(leftover, "a symbolic link, not a file this toolkit wrote"))
            continue
        reason = "interrupted backup (partial file)" if leftover.suffix == ".partial" else "no sidecar"
        points.append(_incomplete(leftover, reason))
    points.sort(key=lambda p: (p.created_at, p.id), reverse=True)
    return points


def _incomplete(path: Path, reason: str, status: str = INCOMPLETE) -> RollbackPoint:
    try:
        st = os.lstat(path)
        created = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(timespec="seconds")
        size = st.st_size
    except OSError:
        created, size = "", 0
    stem = path.name.split(".")[0]
    return RollbackPoint(id=stem, file=path.name if path.suffix != ".json" else None, created_at=created,
                         size_bytes=size, folder=path.parent, status=status, problem=reason)


def _invalid(path: Path, reason: str) -> RollbackPoint:
    """A sidecar (or file) that failed a check: listed with the reason, never acted on."""
    point = _incomplete(path, reason, INVALID)
    point.file = None  # nothing it names is touched, not even by cleanup: only the listed file itself
    point.listed_file = path
    return point


def newest_ok(points: List[RollbackPoint], database: str) -> Optional[RollbackPoint]:
    for point in points:
        if point.status == OK and point.database == database:
            return point
    return None


def resolve(folder: Path, ref: str) -> RollbackPoint:
    """A point named by its dump file, its sidecar, or its id (in $BACKUP_DIR)."""
    given = Path(ref).expanduser()
    if given.suffix == ".partial":
        raise UsageError(f"{ref} is an interrupted backup (partial file); it cannot be used. Nothing was changed.")
    candidates = []
    if given.suffix in (".dump", ".json") or given.exists():
        candidates.append(given.with_suffix(".json") if given.suffix == ".dump" else given)
    candidates.append(folder / f"{given.stem if given.suffix in ('.dump', '.json') else ref}.json")
    for sidecar in candidates:
        if sidecar.is_file():
            try:
                point = load_sidecar(sidecar)
            except (ValueError, TypeError) as exc:
                raise BackupCorrupt(f"the sidecar {sidecar} is not valid ({exc}); this backup cannot be "
                                    "checked, so it is not used. Nothing was changed.") from None
            if given.suffix == ".dump" and point.file != given.name:
                continue
            return point
    if given.is_file():
        raise UsageError(f"{ref} has no sidecar ({given.with_suffix('.json').name}): its checksum cannot be "
                         "verified, so it is not used for a restore. Nothing was changed.")
    raise UsageError(f"no rollback point {ref!r} (looked for a file of that name and for an id in {folder}). "
                     "List them with: python3 rollback_manager.py list")


def sha256_file(path: Path, on_progress: Optional[Callable[[int], None]] = None) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(4 * 1024 * 1024)
            if not chunk:
                break
            digest.update(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done)
    return digest.hexdigest()


def verify_checksum(point: RollbackPoint, on_progress: Optional[Callable[[int], None]] = None) -> None:
    """Full check before any restore: present, the recorded size, the recorded sha256."""
    if point.kind != DUMP:
        return
    quick_check(point)
    if point.status != OK:
        raise BackupCorrupt(f"rollback point {point.id} is {point.status}: {point.problem}. Nothing was changed.")
    actual = sha256_file(point.path, on_progress)
    if actual != point.sha256:
        point.status, point.problem = CORRUPT, f"sha256 is {actual[:16]}…, the sidecar says {str(point.sha256)[:16]}…"
        raise BackupCorrupt(f"rollback point {point.id} is CORRUPT: {point.problem}. Nothing was changed.")


def age_days(point: RollbackPoint, now: Optional[float] = None) -> float:
    try:
        created = datetime.fromisoformat(point.created_at).timestamp()
    except ValueError:
        return 0.0
    return ((now or time.time()) - created) / 86400


def remove_files(point: RollbackPoint) -> List[Path]:
    """Delete a point's dump and sidecar (the sidecar first, so a crash leaves no listed-OK point);
    of an INVALID item only its own listed file. Links are removed, never followed."""
    removed = []
    if point.status == INVALID:
        targets = [point.listed_file] if point.listed_file else []
    else:
        targets = [point.sidecar] if point.status != INCOMPLETE else []
        if point.path:
            targets.append(point.path)
    for path in targets:
        if os.path.lexists(path):
            path.unlink()
            removed.append(path)
    if removed:
        fsync_dir(removed[0].parent)
    return removed


def heads_text(point: RollbackPoint) -> str:
    """The point's migration heads in one line: every framework's where it recorded them, else the
    toolkit's own (points made before)."""
    if point.migration_heads:
        return "; ".join(f"{name}: {head}" for name, head in point.migration_heads.items())
    return point.migration_head or "-"
