"""Release rollback points: configuration, code and database under one id, restored in the
documents' order Configuration -> Code -> Database, verified after each step (the Rollback
Procedures document). A release sidecar in $BACKUP_DIR/releases/ names the three parts and their
checksums; it is written last, so a release whose parts were not all made is never recorded."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .. import storage, trust
from ..errors import RollbackError, UsageError
from ..files import configfiles, folders
from ..log import mask
from ..points import catalog
from ..points.catalog import RollbackPoint

FOLDER = "releases"
ORDER = ("config", "code", "database")
RTO_SECONDS = {"config": 300, "code": 900, "database": 1800}  # the documents' recovery time objectives


class ReleaseFailed(RollbackError):
    pass


@dataclass
class Release:
    id: str
    description: str = ""
    created_at: str = ""
    parts: Dict[str, dict] = field(default_factory=dict)
    format_version: int = 1
    folder: Optional[Path] = field(default=None, repr=False)
    status: str = catalog.OK
    problem: str = ""

    @property
    def sidecar(self) -> Path:
        return self.folder / f"{self.id}.json"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("folder", "status", "problem")}

    def summary(self) -> dict:
        return {**self.to_json(), "status": self.status, "problem": self.problem, "sidecar": str(self.sidecar)}

    def lines(self) -> List[str]:
        p = self.parts
        if self.status == catalog.INVALID:
            return [f"release {self.id}: INVALID ({self.problem})"]
        return [f"release {self.id} ({self.description or '-'}, created {self.created_at}): {self.status}"
                + (f" ({self.problem})" if self.problem else ""),
                f"  config:   {p['config']['path']}",
                f"  code:     {p['code']['path']} (commit {(p['code'].get('commit') or '-')[:12]})",
                f"  database: rollback point {p['database']['id']}"]


def folder_of(backup_dir: Path) -> Path:
    return backup_dir / FOLDER


# code_rollback's metadata file (common.files.coderepo.METADATA: not imported here, since GitPython fails to
# import on a machine without git, where the database commands must still work).
CODE_METADATA = "metadata.json"


def parts_of(config_path: Path, code_path: Path, point: RollbackPoint) -> Dict[str, dict]:
    code_meta = json.loads((code_path / CODE_METADATA).read_text())
    return {"config": {"path": str(config_path), "sha256": folders.sha256_of(config_path / configfiles.MANIFEST)},
            "code": {"path": str(code_path), "sha256": code_meta["bundle_sha256"], "commit": code_meta["commit"],
                     "branch": code_meta["branch"]},
            "database": {"id": point.id, "database": point.database, "kind": point.kind,
                         "sha256": point.sha256, "warm": bool(point.warm_database)}}


def record(backup_dir: Path, description: str, parts: Dict[str, dict]) -> Release:
    folder = storage.ensure_dir(folder_of(backup_dir))
    release_id = catalog.new_id(folder, "release", description)
    release = Release(release_id, description, storage.utc_now().isoformat(timespec="seconds"), parts, folder=folder)
    storage.write_json_atomic(release.sidecar, release.to_json())
    return release


def scan(backup_dir: Path, points: List[RollbackPoint], part_folders: Optional[Dict[str, Path]] = None) -> List[Release]:
    """Every release, newest first, OK only when its three parts are there and match their checksums
    (the database part: its rollback point is OK). A release whose document names a part outside
    its folder (part_folders: CONFIG_BACKUP_DIR and CODE_BACKUP_DIR) is INVALID and never acted on."""
    folder = folder_of(backup_dir)
    if not folder.is_dir():
        return []
    by_id = {p.id: p for p in points}
    found = []
    for path in folder.glob("release_*.json"):
        try:
            data = trust.read_json(path)
            release = Release(**{k: v for k, v in data.items() if k in Release.__dataclass_fields__}, folder=folder)
            validate(release, part_folders)
        except (OSError, ValueError, TypeError) as exc:
            found.append(Release(path.stem, created_at="", folder=folder, status=catalog.INVALID,
                                 problem=f"release document not used: {exc}"))
            continue
        release.status, release.problem = check(release, by_id)
        found.append(release)
    found.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    return found


def validate(release: Release, part_folders: Optional[Dict[str, Path]]) -> None:
    """The parts a release document names: each a `<kind>_<timestamp>` folder directly inside its
    own backup folder, no link; the database part a point id."""
    if not isinstance(release.parts, dict) or not all(isinstance(release.parts.get(k), dict) for k in ORDER):
        raise ValueError("it does not name its three parts")
    if not isinstance(release.created_at, str) or not isinstance(release.description, str):
        raise ValueError("created_at and description must be text")
    for kind in ("config", "code"):
        given = release.parts[kind].get("path")
        if not isinstance(given, str) or not os.path.isabs(given):
            raise ValueError(f"its {kind} part names no absolute folder")
        part = Path(given)
        trust.plain_name(part.name, f"{kind} part")
        if not part.name.startswith(f"{kind}_") or part.is_symlink():
            raise ValueError(f"its {kind} part {given} is not a {kind} backup folder")
        if part_folders is not None and part.parent.resolve() != Path(part_folders[kind]).resolve():
            raise ValueError(f"its {kind} part {given} is not inside {part_folders[kind]}")
    trust.plain_name(release.parts["database"].get("id"), "database part")


def check(release: Release, points: Dict[str, RollbackPoint]) -> tuple:
    config, code, database = (release.parts.get(k, {}) for k in ORDER)
    manifest = Path(config.get("path", "")) / configfiles.MANIFEST
    if not manifest.is_file() or folders.sha256_of(manifest) != config.get("sha256"):
        return catalog.MISSING, f"configuration backup {config.get('path')} is missing or changed"
    try:
        code_meta = json.loads((Path(code.get("path", "")) / CODE_METADATA).read_text())
    except (OSError, ValueError):
        return catalog.MISSING, f"code backup {code.get('path')} is missing"
    if code_meta.get("bundle_sha256") != code.get("sha256"):
        return catalog.CORRUPT, f"code backup {code.get('path')} does not match the release"
    point = points.get(database.get("id"))
    if point is None:
        return catalog.MISSING, f"rollback point {database.get('id')} is missing"
    if point.status != catalog.OK:
        return point.status, f"rollback point {point.id} is {point.status}"
    return catalog.OK, ""


def resolve(releases: List[Release], ref: Optional[str]) -> Release:
    """A release by id (or sidecar path); without one, the newest OK release."""
    if ref is None:
        ok = [r for r in releases if r.status == catalog.OK]
        if not ok:
            raise UsageError("no OK release rollback point. Nothing was changed. Make one before a deployment with: "
                             "python3 rollback_manager.py create --all --description \"Release 42\"")
        return ok[0]
    for r in releases:
        if ref in (r.id, str(r.sidecar), r.sidecar.name):
            if r.status != catalog.OK:
                raise UsageError(f"release {r.id} is {r.status}: {r.problem}. Nothing was changed.")
            return r
    raise UsageError(f"no release {ref!r} (see: python3 rollback_manager.py list). Nothing was changed.")


@dataclass
class Step:
    component: str
    ok: Optional[bool] = None
    seconds: float = 0.0
    error: Optional[str] = None
    detail: str = ""

    @property
    def rto_seconds(self) -> int:
        return RTO_SECONDS[self.component]

    def to_json(self) -> dict:
        return {"component": self.component, "ok": self.ok, "seconds": round(self.seconds, 3),
                "rto_seconds": self.rto_seconds, "error": self.error, "detail": self.detail}

    def line(self) -> str:
        state = {True: "OK", False: "FAILED", None: "not run"}[self.ok]
        timing = (f" in {self.seconds:.1f} s (objective {self.rto_seconds // 60} min: "
                  f"{'met' if self.seconds <= self.rto_seconds else 'MISSED'})") if self.ok is not None else ""
        return f"  {self.component:<9} {state}{timing}" + (f": {self.error}" if self.error else "") + \
            (f" - {self.detail}" if self.detail and not self.error else "")


def run_steps(actions: Dict[str, Callable[[], str]], on_step: Callable[[Step], None]) -> List[Step]:
    """Each component in order; the first failure stops the run (the later ones are not run)."""
    steps = [Step(c) for c in ORDER]
    for step in steps:
        started = time.monotonic()
        try:
            step.detail = actions[step.component]() or ""
            step.ok = True
        except RollbackError as exc:
            step.ok, step.error = False, str(exc)
        except Exception as exc:  # e.g. a folder that cannot be written: the step failed, the run reports it
            step.ok, step.error = False, f"{type(exc).__name__}: {mask(str(exc))}"
        step.seconds = time.monotonic() - started
        on_step(step)
        if not step.ok:
            break
    return steps


class Progress:
    """A marker naming the steps of a release rollback that are done, so that a run killed between
    steps is reported by the next `list` (each step is all-or-nothing on its own)."""

    def __init__(self, backup_dir: Path, release_id: str):
        self.path = storage.ensure_dir(folder_of(backup_dir)) / f".restoring_{release_id}.json"
        self.data = {"release": release_id, "pid": os.getpid(), "started": storage.utc_now().isoformat(), "done": []}
        storage.write_json_atomic(self.path, self.data)

    def record(self, step: Step) -> None:
        if step.ok:
            self.data["done"].append(step.component)
            storage.write_json_atomic(self.path, self.data)

    def finish(self, failed: Optional[str] = None) -> None:
        self.path.unlink(missing_ok=True)


def interrupted(backup_dir: Path) -> List[str]:
    """What the next `list` says of release rollbacks that were killed between steps."""
    folder = folder_of(backup_dir)
    lines = []
    for marker in sorted(folder.glob(".restoring_*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if _alive(data.get("pid")):
            lines.append(f"release {data['release']}: a rollback is running (pid {data['pid']})")
            continue
        done = data.get("done", [])
        rest = [c for c in ORDER if c not in done]
        lines.append(f"release {data['release']}: a rollback was interrupted: restored {', '.join(done) or 'nothing'}; "
                     f"as they were: {', '.join(rest)}. Run `python3 rollback_manager.py restore --all --file "
                     f"{data['release']}` to finish it.")
    return lines


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False
