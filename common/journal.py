"""The restore journal: which rollback point each database was last restored from (DESIGN §4).

`verify` compares a database with the point it was restored from, not merely the newest one: after
point A, a change, point B and a restore of A, staging must be compared with A. One small JSON file
in $BACKUP_DIR, written atomically after each successful restore or reset."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import storage, trust

NAME = ".restore-journal.json"


def read(folder: Path) -> dict:
    try:
        data = trust.read_json(Path(folder) / NAME)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(folder: Path, database: str, point_id: Optional[str], source: str) -> None:
    """After a restore (point_id) or a reset from V2 (point_id None, source says so)."""
    data = read(folder)
    data[database] = {"point": point_id, "source": source, "at": storage.utc_now().isoformat(timespec="seconds")}
    storage.ensure_dir(folder)
    storage.write_json_atomic(Path(folder) / NAME, data)


def last(folder: Path, database: str) -> Optional[dict]:
    entry = read(folder).get(database)
    if not isinstance(entry, dict) or not isinstance(entry.get("at"), str):
        return None
    return entry


def reference(folder: Path, area: str, found: list) -> tuple:
    """Of backups `found` (newest first, each with a .path), the one `area` was last restored from,
    else the newest; and why it was chosen, in words."""
    entry = last(folder, area)
    chosen = next((b for b in found if entry and b.path.name == entry.get("point")), None)
    why = f"the backup last restored, at {entry['at']}" if chosen else \
        "the newest backup (none was restored by this toolkit)" if entry is None else \
        f"the newest backup: the one last restored ({entry.get('point')}) is gone"
    return chosen or (found[0] if found else None), why
