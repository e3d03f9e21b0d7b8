"""Which databases this toolkit made: a comment it sets on each warm copy and snapshot.

A name alone proves nothing: anyone may create `staging__warm_x`, and a second BACKUP_DIR's
copies carry the same prefix. So a copy is marked right after CREATE DATABASE with a comment that
names its kind, the BACKUP_DIR whose sidecar describes it and the point's id, and the toolkit
drops a copy as an orphan, or uses one, only when the mark says it is this folder's. (A TEMPLATE
copy does not carry a database comment, so a restore made from a marked copy is not marked.)"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from psycopg2 import sql

from . import database as db

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
