"""Cutting a database's connections so that they come back, however the run ends.

`ALTER DATABASE ... ALLOW_CONNECTIONS false` then `pg_terminate_backend`, so clients cannot
reconnect in between (a rename or a TEMPLATE copy waits about 5 s for other sessions, then fails).
A marker in $BACKUP_DIR names the databases whose connections are cut; it is removed only once
they are allowed again, so when a run dies (or its server goes away) in between, the next run
under the same lock reads it and allows them first."""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import psycopg2

from . import catalog
from . import database as db
from .log import get_logger


def marker_path(folder: Path, target: str) -> Path:
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    return folder / f".inflight_{catalog.slug(target)}_{digest}.json"


def recover(conn, folder: Path, target: str) -> None:
    """Allow connections again where an interrupted run left them cut (call under the target's lock)."""
    marker = marker_path(folder, target)
    if not marker.exists():
        return
    try:
        names = json.loads(marker.read_text()).get("databases", [])
    except (OSError, ValueError):
        names = [target]
    for name in names:
        if db.allows_connections(conn, name) is False:
            db.set_allow_connections(conn, name, True)
            get_logger().warning("Connections to %s had been left cut by an interrupted run: allowed again.", name)
    marker.unlink()


def allow_again(conn, name: str) -> bool:
    """True once `name` accepts connections (or does not exist); False when that could not be done."""
    try:
        if db.allows_connections(conn, name) is False:
            db.set_allow_connections(conn, name, True)
        return True
    except psycopg2.Error as exc:
        get_logger().error("could not allow connections to %s again (%s); the next run of this command "
                           "does it first", name, db.reason(exc))
        return False


@contextmanager
def cut(conn, folder: Path, target: str, also: List[str] = (), state: Optional["Cut"] = None) -> Iterator["Cut"]:
    """`with cut(conn, folder, 'staging', also=[kept_as]) as c:` — connections to the target are
    refused and cut inside the block; on the way out, whatever happened, the target and `also`
    accept connections again (or the marker stays for the next run)."""
    names = [target, *also]
    marker = marker_path(folder, target)
    catalog.ensure_dir(folder)
    catalog.write_json_atomic(marker, {"target": target, "databases": names, "pid": os.getpid(),
                                       "started": catalog.utc_now().isoformat(timespec="seconds")})
    state = state or Cut()
    try:
        db.set_allow_connections(conn, target, False)
        found = db.sessions(conn, target)
        if found:
            get_logger().info("Cutting %d connection(s) to %s:", len(found), target)
            db.log_sessions(found)
        state.sessions_cut = db.terminate_sessions(conn, target)
        yield state
    finally:
        state.allowed = all([allow_again(conn, name) for name in names])
        if state.allowed:
            marker.unlink()


class Cut:
    """What a cut did: how many sessions it ended, whether connections were allowed again after."""

    def __init__(self) -> None:
        self.sessions_cut = 0
        self.allowed = True
