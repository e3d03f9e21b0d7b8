"""SQL migrations in $MIGRATIONS_DIR, tracked in public.schema_migrations (DESIGN §7).

`<version>_<name>.sql` applies a migration, `<version>_<name>.down.sql` reverts it. Each is run
in one transaction together with its tracking row, so a failure leaves no half-applied step."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import psycopg2

from ..errors import ConfigError, RollbackError, UsageError
from ..log import get_logger
from . import database as db
from . import frameworks

_FILE = re.compile(r"^(?P<version>[0-9][0-9A-Za-z.]*)_(?P<name>[^.]+)\.sql$")
TRACKING_DDL = """CREATE TABLE IF NOT EXISTS public.schema_migrations (
    version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())"""


@dataclass
class Migration:
    version: str
    name: str
    path: Path
    down: Optional[Path]

    @property
    def full_name(self) -> str:
        return f"{self.version}_{self.name}"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class Applied:
    version: str
    name: str
    checksum: str
    applied_at: str


@dataclass
class Status:
    migrations: List[Migration]
    applied: Dict[str, Applied]

    @property
    def pending(self) -> List[Migration]:
        return [m for m in self.migrations if m.version not in self.applied]

    @property
    def edited(self) -> List[Migration]:
        return [m for m in self.migrations
                if m.version in self.applied and self.applied[m.version].checksum != m.checksum]

    @property
    def missing_files(self) -> List[Applied]:
        known = {m.version for m in self.migrations}
        return [a for v, a in self.applied.items() if v not in known]

    @property
    def head(self) -> Optional[str]:
        return max(self.applied, key=_order) if self.applied else None

    def to_json(self) -> dict:
        edited = {m.version for m in self.edited}
        return {"head": self.head,
                "migrations": [{"version": m.version, "name": m.name, "file": str(m.path),
                                "down": str(m.down) if m.down else None,
                                "state": ("edited" if m.version in edited else "applied")
                                if m.version in self.applied else "pending",
                                "applied_at": self.applied[m.version].applied_at if m.version in self.applied else None}
                               for m in self.migrations],
                "applied_without_file": [a.version + "_" + a.name for a in self.missing_files]}

    def lines(self) -> List[str]:
        edited = {m.version for m in self.edited}
        out = [f"head: {self.head or '(none applied)'}"]
        for m in self.migrations:
            if m.version in edited:
                state = "EDITED since applied (checksum differs)"
            elif m.version in self.applied:
                state = f"applied {self.applied[m.version].applied_at}"
            else:
                state = "pending"
            down = "" if m.down else "  (no down script)"
            out.append(f"  {m.full_name:<40} {state}{down}")
        out += [f"  {a.version}_{a.name:<36} applied, but its file is missing" for a in self.missing_files]
        return out


def _order(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.]", version))


def discover(folder: Path) -> List[Migration]:
    if not folder.is_dir():
        raise ConfigError(f"the migrations folder {folder} does not exist (set MIGRATIONS_DIR). Nothing was changed.")
    found: Dict[str, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        if path.name.endswith(".down.sql"):
            continue
        match = _FILE.match(path.name)
        if not match:
            get_logger().warning("ignoring %s: not named <version>_<name>.sql", path.name)
            continue
        version = match.group("version")
        if version in found:
            raise ConfigError(f"two migrations have version {version}: {found[version].path.name} and {path.name}")
        down = path.with_name(f"{version}_{match.group('name')}.down.sql")
        found[version] = Migration(version, match.group("name"), path, down if down.exists() else None)
    return sorted(found.values(), key=lambda m: _order(m.version))


def read_status(conn, migrations: List[Migration]) -> Status:
    refuse_managed(conn)
    applied: Dict[str, Applied] = {}
    if db.scalar(conn, "SELECT to_regclass('public.schema_migrations') IS NOT NULL"):
        for version, name, checksum, at in db.rows(conn, """SELECT version, name, checksum,
                to_char(applied_at, 'YYYY-MM-DD HH24:MI:SS') FROM public.schema_migrations"""):
            applied[version] = Applied(version, name, checksum, at)
    return Status(migrations, applied)


def refuse_managed(conn) -> None:
    """The toolkit's own migrations stay out of a database an application framework migrates."""
    found = frameworks.heads(conn)
    managed = frameworks.managed_by(found)
    if managed:
        name = managed[0]
        raise UsageError(f"this database is managed by {name} (its migrations stand at {found[name]}): use "
                         f"`{frameworks.COMMANDS[name]}` instead; the toolkit's own migrate, status and rollback "
                         "would add their table beside it. Nothing was changed.")


def resolve(migrations: List[Migration], target: str) -> Migration:
    for m in migrations:
        if target in (m.version, m.full_name, m.path.name):
            return m
    known = ", ".join(m.full_name for m in migrations) or "none"
    raise UsageError(f"no migration {target!r} (known: {known}). Nothing was changed.")


def to_apply(status: Status, target: Optional[str]) -> List[Migration]:
    pending = status.pending
    if target is None:
        return pending
    limit = resolve(status.migrations, target)
    return [m for m in pending if _order(m.version) <= _order(limit.version)]


def to_revert(status: Status, target: str) -> List[Migration]:
    """Migrations applied after the target, newest first; refuses when any cannot be reverted."""
    goal = resolve(status.migrations, target)
    if goal.version not in status.applied:
        raise UsageError(f"migration {goal.full_name} is not applied (head: {status.head or 'none'}); "
                         "nothing to roll back to. Nothing was changed.")
    newer = [m for m in status.migrations
             if m.version in status.applied and _order(m.version) > _order(goal.version)]
    orphans = [a for a in status.missing_files if _order(a.version) > _order(goal.version)]
    if orphans:
        raise UsageError("applied migrations have no file any more: " +
                         ", ".join(f"{a.version}_{a.name}" for a in orphans) + ". Nothing was changed.")
    edited = [m for m in newer if m in status.edited] + ([goal] if goal in status.edited else [])
    if edited:
        raise UsageError("migrations were edited since they were applied (checksum differs): " +
                         ", ".join(m.path.name for m in edited) + ". Their down scripts may not match what "
                         "ran. Nothing was changed.")
    return list(reversed(newer))


def apply(info: db.ConnInfo, migration: Migration) -> None:
    """The migration and its tracking row, in one transaction."""
    _in_transaction(info, migration.path, migration, """INSERT INTO public.schema_migrations
        (version, name, checksum) VALUES (%s, %s, %s)""", (migration.version, migration.name, migration.checksum))


def revert(info: db.ConnInfo, migration: Migration) -> None:
    """The down script and the removal of the tracking row, in one transaction."""
    assert migration.down is not None
    _in_transaction(info, migration.down, migration,
                    "DELETE FROM public.schema_migrations WHERE version = %s", (migration.version,))


def _in_transaction(info: db.ConnInfo, script: Path, migration: Migration, tracking_sql: str, args: tuple) -> None:
    conn = db.connect(info, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute(TRACKING_DDL)
            cur.execute(script.read_text(encoding="utf-8"))
            cur.execute(tracking_sql, args)
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise MigrationFailed(script, exc) from None
    finally:
        conn.close()


class MigrationFailed(RollbackError):
    def __init__(self, script: Path, exc: psycopg2.Error):
        self.script = script
        where = ""
        diag = getattr(exc, "diag", None)
        if diag is not None and getattr(diag, "statement_position", None):
            where = f" (at character {diag.statement_position})"
        super().__init__(f"{script.name} failed{where}: {db.reason(exc)}. Its transaction was rolled back.")
