"""Which databases this toolkit made: a comment it sets on each warm copy and snapshot.

A name alone proves nothing: anyone may create `staging__warm_x`, and a second BACKUP_DIR's
copies carry the same prefix. So a copy is marked right after CREATE DATABASE with a comment that
names its kind, the BACKUP_DIR whose sidecar describes it and the point's id, and the toolkit
drops a copy as an orphan, or uses one, only when the mark says it is this folder's. (A TEMPLATE
copy does not carry a database comment, so a restore made from a marked copy is not marked.)"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from psycopg2 import sql

from ..pg import database as db
from ..storage import write_json_atomic

MAKER = "rollback-toolkit"


@dataclass(frozen=True)
class Mark:
    kind: str  # "warm" or "snapshot"
    folder: str  # the BACKUP_DIR, resolved
    point: str  # the rollback point's id ('' while it has none yet)

    def is_of(self, kind: str, folder: Path, point: Optional[str] = None) -> bool:
        return (self.kind == kind and self.folder == str(Path(folder).resolve())
                and (point is None or self.point == point))


def put(conn, name: str, kind: str, folder: Path, point: str = "") -> None:
    text = json.dumps({"made_by": MAKER, "kind": kind, "backup_dir": str(Path(folder).resolve()), "point": point},
                      sort_keys=True)
    db.execute(conn, sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(text)))


def read(conn, name: str) -> Optional[Mark]:
    """The toolkit's mark on a database, or None (no such database, no comment, someone else's)."""
    text = db.scalar(conn, """SELECT shobj_description(oid, 'pg_database') FROM pg_database
                              WHERE datname = %s""", (name,))
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("made_by") != MAKER:
        return None
    fields = (data.get("kind"), data.get("backup_dir"), data.get("point", ""))
    if not all(isinstance(f, str) for f in fields):
        return None
    return Mark(*fields)


def _intent_path(folder: Path, name: str) -> Path:
    return Path(folder) / f".making_{hashlib.sha256(name.encode()).hexdigest()[:16]}.json"


def intend(folder: Path, name: str, kind: str) -> Path:
    """Before CREATE DATABASE: a note in BACKUP_DIR that this run is making `name`, so that a kill
    before the mark is set still leaves the database provably this folder's (removed with forget)."""
    path = _intent_path(folder, name)
    write_json_atomic(path, {"made_by": MAKER, "kind": kind, "database": name})
    return path


def forget(folder: Path, name: str) -> None:
    try:
        os.unlink(_intent_path(folder, name))
    except FileNotFoundError:
        pass


def intended(folder: Path, kind: str) -> set:
    """Databases of that kind a run of this folder began to make (and may have been killed making)."""
    from ..trust import read_json
    names = set()
    for path in Path(folder).glob(".making_*.json"):
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("made_by") == MAKER and data.get("kind") == kind \
                and isinstance(data.get("database"), str) and path == _intent_path(folder, data["database"]):
            names.add(data["database"])
    return names


def ours(conn, name: str, kind: str, folder: Path) -> bool:
    """Whether this folder's runs made the database: its mark says so, or a run noted it was making it."""
    mark = read(conn, name)
    return (mark is not None and mark.is_of(kind, folder)) or name in intended(folder, kind)
