"""Publishing the code (DESIGN §8): `DEPLOYMENT_DIR/releases/<ts>_<commit>/` exported from a commit
(HEAD: uncommitted files are not published), `current` switched to it in one step, and old
releases pruned, never a folder the toolkit did not make nor files it did not write."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

import git

from .. import storage, trust
from ..log import get_logger
from ..storage import stamp, utc_now
from .coderepo import SAFE

KEEP_RELEASES = 5


def publish(repo: git.Repo, deploy_dir: Path, commit: str) -> Path:
    """Export the commit's tree to releases/<ts>_<short>/, then point `current` at it atomically
    (new symlink renamed over the old); keep the newest releases and always the current one."""
    releases = deploy_dir / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    name = f"{stamp()}_{commit[:8]}"
    partial = releases / f".{name}.partial"
    partial.mkdir()
    with tempfile.TemporaryFile() as archive:
        repo.git.execute(["git", *SAFE, "archive", "--format=tar", commit], output_stream=archive)
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            safe = {"filter": "tar"} if hasattr(tarfile, "data_filter") else {}  # Python 3.9.17+/3.11.4+
            tar.extractall(partial, **safe)
            written = sorted(m.name.rstrip("/") for m in tar.getmembers() if not m.isdir())
    storage.write_json_atomic(partial / ".release.json", {"commit": commit, "created_at": utc_now().isoformat(),
                                                        "made_by": "rollback-toolkit", "files": written})
    final = releases / name
    os.rename(partial, final)
    link_tmp = deploy_dir / f".current.tmp-{os.getpid()}"
    link_tmp.unlink(missing_ok=True)
    os.symlink(os.path.join("releases", name), link_tmp)
    os.replace(link_tmp, deploy_dir / "current")
    storage.fsync_dir(deploy_dir)
    prune_releases(deploy_dir)
    return final


def current_release(deploy_dir: Path) -> Optional[Path]:
    link = deploy_dir / "current"
    return (deploy_dir / os.readlink(link)).resolve() if link.is_symlink() else None


def _written_by_us(release: Path) -> Optional[List[str]]:
    """The files the toolkit wrote into a release folder, from its .release.json; None for a folder
    it did not make (it is never pruned, nor taken for a release)."""
    try:
        data = trust.read_json(release / ".release.json")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("made_by") != "rollback-toolkit" or not isinstance(data.get("files"), list):
        return None
    return data["files"]


def prune_releases(deploy_dir: Path, keep: int = KEEP_RELEASES) -> None:
    """Keep the newest releases the toolkit made and the current one. A folder it did not make is
    never pruned; one holding files it did not write is kept, with a warning naming them."""
    log = get_logger()
    ours = []
    for p in (deploy_dir / "releases").iterdir():
        if p.is_dir() and not p.is_symlink() and not p.name.startswith("."):
            written = _written_by_us(p)
            if written is None:
                log.warning("%s was not made by this toolkit: it is left alone and not counted as a release.", p)
            else:
                ours.append((p, written))
    ours.sort(key=lambda item: item[0].name, reverse=True)
    current = current_release(deploy_dir)
    for old, written in ours[keep:]:
        if current is not None and old.resolve() == current:
            continue
        present = {str(f.relative_to(old)) for f in old.rglob("*") if not f.is_dir()} - {".release.json"}
        extra = sorted(present - set(written))
        if extra:
            log.warning("Not removing old release %s: it holds %d file(s) this toolkit did not write (%s). Move them, "
                        "then delete the folder.", old, len(extra), ", ".join(extra[:5]))
            continue
        shutil.rmtree(old, ignore_errors=True)


def release_commit(release: Optional[Path]) -> Optional[str]:
    if release is None:
        return None
    try:
        return json.loads((release / ".release.json").read_text()).get("commit")
    except (OSError, ValueError):
        return None
