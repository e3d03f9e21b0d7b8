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
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import psycopg2

from . import catalog
from . import database as db
from .errors import RollbackError
from .log import get_logger

DEFAULT_WAIT = 30.0


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
def cut(conn, folder: Path, target: str, also: List[str] = (), state: Optional["Cut"] = None,
        wait: float = DEFAULT_WAIT) -> Iterator["Cut"]:
    """`with cut(conn, folder, 'staging', also=[kept_as]) as c:` — connections to the target are
    refused and cut inside the block; on the way out, whatever happened, the target and `also`
    accept connections again (or the marker stays for the next run). Sessions this role may not
    cut (another superuser's) are waited for up to `wait` seconds, with connections allowed
    meanwhile, then named in a SessionsRemain error."""
    names = [target, *also]
    marker = marker_path(folder, target)
    catalog.ensure_dir(folder)
    catalog.write_json_atomic(marker, {"target": target, "databases": names, "pid": os.getpid(),
                                       "started": catalog.utc_now().isoformat(timespec="seconds")})
    state = state or Cut()
    try:
        state.sessions_cut = cut_sessions(conn, target, wait)
        yield state
    finally:
        state.allowed = all([allow_again(conn, name) for name in names])
        if state.allowed:
            marker.unlink()


def cut_sessions(conn, target: str, wait: float = DEFAULT_WAIT) -> int:
    """Refuse new connections to the target and cut its sessions; returns how many were cut.
    Raises SessionsRemain (connections allowed again) when some cannot be cut within `wait` s."""
    log = get_logger()
    deadline = time.monotonic() + max(0.0, wait)
    done, announced = 0, False
    while True:
        db.set_allow_connections(conn, target, False)
        found = db.sessions(conn, target)
        if found and not announced:
            log.info("Cutting %d connection(s) to %s:", len(found), target)
            db.log_sessions(found)
            announced = True
        count, refused = db.terminate_sessions(conn, target)
        done += count
        if not refused:
            return done
        # Let clients in again while we wait: the session we may not cut may take a while to end.
        db.set_allow_connections(conn, target, True)
        if time.monotonic() >= deadline:
            raise SessionsRemain(target, refused, wait)
        log.warning("waiting for %d session(s) this role may not cut (up to %.0f s more): %s", len(refused),
                    deadline - time.monotonic(), "; ".join(s.describe() for s in refused))
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


class SessionsRemain(RollbackError):
    """Sessions of the target that the running role may not terminate, still there after the wait."""

    def __init__(self, target: str, found: List[db.Session], wait: float):
        self.sessions = found
        listed = "\n  ".join(s.describe() for s in found)
        super().__init__(f"{len(found)} session(s) of {target} cannot be cut by this role and were still there "
                         f"after {wait:.0f} s:\n  {listed}\n{target} is unchanged and accepts connections. Ask "
                         "their owner to disconnect (or a superuser to run SELECT pg_terminate_backend(pid)), or "
                         "wait longer with --wait SECONDS, then run this again.")


class Cut:
    """What a cut did: how many sessions it ended, whether connections were allowed again after."""

    def __init__(self) -> None:
        self.sessions_cut = 0
        self.allowed = True
