"""Configuration rollback (DESIGN §9): backups of $CONFIG_DIR and $ENV_FILE with a manifest,
restores file by file (temporary name, fsync, rename), deep-merge updates that must parse."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from dotenv.parser import parse_stream

from .. import trust
from ..errors import UsageError
from ..testing import testhooks
from . import folders

PREFIX, MANIFEST = "config", "manifest.json"
PARSED = (".yml", ".yaml", ".json")
SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|token|key|credential)")


@dataclass
class Entry:
    area: str      # "config" (under CONFIG_DIR) or "env" (the ENV_FILE)
    path: str      # relative to CONFIG_DIR, or the env file's name
    sha256: str
    mode: int
    size: int


_OUR_TEMP = re.compile(r"^\..+\.tmp-\d+$")  # folders.replace_many's temporary names


def _walk(config_dir: Path, temps: Optional[List[Path]] = None) -> List[Path]:
    """Regular files under config_dir; temporary files of an interrupted restore go to `temps`."""
    found = []
    if config_dir.is_dir():
        for root, dirs, names in os.walk(config_dir):
            dirs.sort()
            for name in sorted(names):
                path = Path(root) / name
                if _OUR_TEMP.match(name):
                    if temps is not None:
                        temps.append(path)
                elif path.is_file() and not path.is_symlink():
                    found.append(path)
    return found


def remove_leftover_temps(config_dir: Path, env_file: Optional[Path]) -> List[Path]:
    temps: List[Path] = []
    _walk(config_dir, temps)
    if env_file is not None:
        temps += [p for p in env_file.parent.glob(f".{env_file.name}.tmp-*") if _OUR_TEMP.match(p.name)]
    for path in temps:
        path.unlink()
    return temps


def current_entries(config_dir: Path, env_file: Optional[Path]) -> Dict[Tuple[str, str], Tuple[Path, Entry]]:
    out = {}
    for path in _walk(config_dir):
        rel = str(path.relative_to(config_dir))
        st = path.stat()
        out[("config", rel)] = (path, Entry("config", rel, folders.sha256_of(path), stat.S_IMODE(st.st_mode), st.st_size))
    if env_file is not None and env_file.is_file():
        st = env_file.stat()
        out[("env", env_file.name)] = (env_file, Entry("env", env_file.name, folders.sha256_of(env_file),
                                                       stat.S_IMODE(st.st_mode), st.st_size))
    return out


def backup(config_dir: Path, env_file: Optional[Path], parent: Path, reason: str = "") -> Path:
    """`<parent>/config_<ts>/` holding copies (0600) under files/ and manifest.json (path, sha256, mode)."""
    partial = folders.new_backup_dir(parent, PREFIX)
    sources = [("config", str(p.relative_to(config_dir)), p) for p in _walk(config_dir)]
    if env_file is not None and env_file.is_file():
        sources.append(("env", env_file.name, env_file))
    entries = []
    for area, rel, path in sources:
        data = path.read_bytes()  # read once: the checksum is of exactly what was copied
        target = partial / "files" / area / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        entries.append(Entry(area, rel, hashlib.sha256(data).hexdigest(), stat.S_IMODE(path.stat().st_mode),
                             len(data)).__dict__)
    # The folder is *.partial until finish_backup_dir renames it: one flush for all the copies.
    folders.sync_filesystem(partial)
    meta = {"format_version": 1, "kind": "config", "config_dir": str(config_dir),
            "env_file": str(env_file) if env_file else None, "reason": reason, "files": entries}
    return folders.finish_backup_dir(partial, MANIFEST, meta)


def safe_mode(mode: int) -> int:
    """The permission bits a restored file gets: never setuid, setgid or sticky (DESIGN §3)."""
    return mode & 0o777


def _valid_entry(e: Entry) -> Entry:
    """A manifest entry as this toolkit writes it: a relative path that stays in its folder."""
    if e.area not in ("config", "env") or not isinstance(e.path, str) or not isinstance(e.sha256, str):
        raise ValueError("unknown area or path")
    parts = Path(e.path).parts
    if not parts or os.path.isabs(e.path) or any(p in ("..", ".") for p in parts) or "\x00" in e.path:
        raise ValueError(f"path {e.path!r} leaves its folder")
    if e.area == "env" and len(parts) != 1:
        raise ValueError(f"env entry {e.path!r} is not a plain file name")
    if not re.fullmatch(r"[0-9a-f]{64}", e.sha256):
        raise ValueError(f"{e.path}: sha256 is not a checksum")
    for value in (e.mode, e.size):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{e.path}: mode and size must be whole numbers")
    return e


def load_backup(path: Path) -> dict:
    """The manifest, after checking every entry (paths that stay in their folder, types) and every
    file of the backup against it (nothing is changed on a mismatch)."""
    try:
        meta = trust.read_json(path / MANIFEST)
        entries = [_valid_entry(Entry(**e)) for e in meta["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a configuration backup this toolkit wrote (its {MANIFEST}: {exc}). "
                         "Nothing was changed.") from None
    for e in entries:
        trust.inside(path / "files" / e.area, Path(e.path).parts[0], "backup file")
        copy_path = path / "files" / e.area / e.path
        if not copy_path.is_file() or folders.sha256_of(copy_path) != e.sha256:
            raise UsageError(f"backup {path} does not match its manifest ({e.area}/{e.path} is missing or "
                             "changed). Nothing was changed.")
    meta["entries"] = entries
    return meta


@dataclass
class RestoreResult:
    written: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    unchanged: int = 0


def restore(backup_path: Path, meta: dict, config_dir: Path, env_file: Optional[Path],
            present: Optional[dict] = None) -> RestoreResult:
    """Every file back byte for byte with its mode, each by temporary name + fsync + rename; files
    added since the backup are removed afterwards; checksums verified at the end. `present` is the
    manifest of the backup just taken of the current state (it saves hashing every file again)."""
    result = RestoreResult()
    result.removed += [f"leftover {p}" for p in remove_leftover_temps(config_dir, env_file)]
    wanted = {(e.area, e.path): e for e in meta["entries"]}
    if present is None:
        now = current_entries(config_dir, env_file)
    else:
        now = {(e["area"], e["path"]): (config_dir / e["path"] if e["area"] == "config" else env_file, Entry(**e))
               for e in present["files"]}
    todo = []
    for key, e in wanted.items():
        target = _target(e, config_dir, env_file)
        have = now.get(key)
        if have and have[1].sha256 == e.sha256 and have[1].mode == safe_mode(e.mode):
            result.unchanged += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        todo.append((target, (backup_path / "files" / e.area / e.path).read_bytes(), safe_mode(e.mode)))
        result.written.append(f"{e.area}/{e.path}")
    folders.replace_many(todo, on_each=lambda _: testhooks.checkpoint("config-restore-file-written"))
    holds_env = any(area == "env" for area, _ in wanted)
    for key, (path, _) in now.items():
        if key not in wanted and (key[0] == "config" or holds_env):  # ENV_FILE goes only when the backup holds one
            path.unlink()
            result.removed.append(f"{key[0]}/{key[1]}")
    for target, data, _ in todo:
        if folders.sha256_of(target) != hashlib.sha256(data).hexdigest():
            raise UsageError(f"after the restore {target} does not match the backup: check the disk")
    _remove_empty_dirs(config_dir)
    return result


def _target(e: Entry, config_dir: Path, env_file: Optional[Path]) -> Path:
    if e.area == "config":
        return _inside(config_dir, config_dir / e.path)
    if env_file is None:
        raise UsageError("the backup holds an env file but ENV_FILE is not set. Nothing was changed.")
    return env_file


def _remove_empty_dirs(config_dir: Path) -> None:
    for root in sorted((w[0] for w in os.walk(config_dir)), key=len, reverse=True):
        if Path(root) != config_dir and not os.listdir(root):
            os.rmdir(root)


def _inside(config_dir: Path, path: Path) -> Path:
    """The real path, refused when it leaves CONFIG_DIR (.., an absolute path, a symlink outside)."""
    base = config_dir.resolve()
    real = path.resolve()
    if real != base and base not in real.parents:
        raise UsageError(f"{path} is outside CONFIG_DIR ({base}); refused. Nothing was changed.")
    return real


def target_file(config_dir: Path, name: str, env_file: Optional[Path] = None) -> Path:
    """The file `update` may change: a YAML, JSON or *.env file under CONFIG_DIR, or the ENV_FILE
    (named by its name, e.g. .env, or its path)."""
    if env_file is not None and not (config_dir / name).is_file() and (
            name == env_file.name or Path(name).expanduser().resolve() == env_file.resolve()):
        if not env_file.is_file():
            raise UsageError(f"ENV_FILE {env_file} does not exist. Nothing was changed.")
        return env_file
    if os.path.isabs(name):
        raise UsageError(f"FILE must be relative to CONFIG_DIR ({config_dir}), not absolute: {name}. Nothing was changed.")
    real = _inside(config_dir, config_dir / name)
    if real.suffix not in PARSED and real.suffix != ".env" and real.name != ".env":
        raise UsageError(f"{name}: only .yml, .yaml, .json and .env files can be updated. Nothing was changed.")
    if not real.is_file():
        raise UsageError(f"{name} does not exist in {config_dir}. Nothing was changed.")
    return real


def parse_file(path: Path) -> Any:
    """Parse YAML or JSON; errors name the file and line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix not in PARSED:
        errors = env_errors(path)
        if errors:
            raise UsageError("; ".join(errors[:3]) + ". Nothing was changed.")
        return None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: line {exc.lineno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if context is not None and getattr(exc, "context", None):
            problem += f" ({exc.context} that starts at line {context.line + 1})"
        raise UsageError(f"{path}: {where}{problem}") from None


def env_errors(path: Path) -> List[str]:
    with open(path, encoding="utf-8") as fh:
        return [f"{path}: line {b.original.line}: cannot parse {b.original.string.strip()[:40]!r}"
                for b in parse_stream(fh) if b.error]


def deep_merge(base: Any, patch: Dict[str, Any], prefix: str = "") -> Tuple[Any, List[Tuple[str, Any, Any]]]:
    """Merge patch into base (null deletes a key, lists and scalars are replaced); returns the new
    value and the (key, old, new) changes."""
    result = copy.deepcopy(base) if isinstance(base, dict) else {}
    changes = []
    for key, value in patch.items():
        path = f"{prefix}{key}"
        old = result.get(key, _MISSING)
        if value is None:
            if key in result:
                del result[key]
                changes.append((path, old, _MISSING))
        elif isinstance(value, dict) and isinstance(old, dict):
            result[key], sub = deep_merge(old, value, path + ".")
            changes += sub
        elif old != value:
            result[key] = copy.deepcopy(value)
            changes.append((path, old, value))
    return result, changes


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def show_value(key: str, value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    if SECRET_KEY.search(key.split(".")[-1]) and not isinstance(value, dict):
        return "***"
    return json.dumps(value, ensure_ascii=False)


def parse_patch(patch_text: str) -> Dict[str, Any]:
    try:
        patch = json.loads(patch_text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the JSON argument does not parse (column {exc.colno}: {exc.msg}). Nothing was changed.") from None
    if not isinstance(patch, dict):
        raise UsageError("the JSON argument must be an object, like '{\"key\": \"value\"}'. Nothing was changed.")
    return patch


@dataclass
class Drift:
    added: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)


def drift(meta: dict, config_dir: Path, env_file: Optional[Path]) -> Drift:
    wanted = {(e["area"], e["path"]): e for e in meta["files"]}
    now = current_entries(config_dir, env_file)
    if not any(area == "env" for area, _ in wanted):  # a backup without ENV_FILE leaves it alone
        now = {k: v for k, v in now.items() if k[0] != "env"}
    d = Drift()
    d.added = sorted(f"{a}/{p}" for (a, p) in now if (a, p) not in wanted)
    d.removed = sorted(f"{a}/{p}" for (a, p) in wanted if (a, p) not in now)
    d.changed = sorted(f"{a}/{p}" for (a, p), (_, e) in now.items()
                       if (a, p) in wanted and (e.sha256, e.mode) != (wanted[(a, p)]["sha256"],
                                                                       safe_mode(wanted[(a, p)]["mode"])))
    return d
