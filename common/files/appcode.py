"""The migrations the application's code expects (DESIGN §7, "The application's migrations"): read
from the files at REPO_PATH, compared with those its database has applied (common.pg.frameworks).

Django: `<app>/migrations/NNNN_name.py`; Alembic: the revisions under its script location (from
alembic.ini), whose heads the database must be at; Flyway: `V<version>__<description>.sql`; Rails:
`db/migrate/<version>_<name>.rb`; Prisma: `prisma/migrations/<name>/migration.sql`. Only files are
read: nothing of the application is imported or run."""
from __future__ import annotations

import configparser
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Set

_SKIP = {".git", "node_modules", "__pycache__", ".venv", "venv", "site-packages", ".tox", "dist", "build"}
_DJANGO = re.compile(r"^(\d{4}_\w+)\.py$")
_FLYWAY = re.compile(r"^V([0-9][0-9._]*)__.+\.sql$")
_RAILS = re.compile(r"^(\d{14})_\w+\.rb$")
_REVISION = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*(.+)$""", re.M)


def _walk(root: Path):
    for current, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP and not d.startswith(".")]
        yield Path(current), names


def expected(repo: Path) -> Dict[str, Set[str]]:
    """Each framework's migrations in the code, as the database records them: Django 'app name',
    Alembic its head revisions, Flyway versions, Rails versions, Prisma migration names."""
    found: Dict[str, Set[str]] = {}
    for folder, names in _walk(repo):
        if folder.name == "migrations" and "__init__.py" in names and folder.parent != repo:
            found.setdefault("django", set()).update(f"{folder.parent.name} {m.group(1)}" for n in names
                                                     if (m := _DJANGO.match(n)))
        flyway = {m.group(1).replace("_", ".") for n in names if (m := _FLYWAY.match(n))}
        if flyway:
            found.setdefault("flyway", set()).update(flyway)
        if folder.name == "migrate" and folder.parent.name == "db":
            found.setdefault("rails", set()).update(m.group(1) for n in names if (m := _RAILS.match(n)))
        if folder.name == "migrations" and folder.parent.name == "prisma":
            found.setdefault("prisma", set()).update(
                d for d in sorted(os.listdir(folder)) if (folder / d / "migration.sql").is_file())
    heads = alembic_heads(repo)
    if heads is not None:
        found["alembic"] = heads
    return {k: v for k, v in found.items() if v or k == "alembic"}


def alembic_heads(repo: Path) -> Optional[Set[str]]:
    """The head revisions of the Alembic scripts named by REPO_PATH/alembic.ini (None: no Alembic)."""
    ini = repo / "alembic.ini"
    if not ini.is_file():
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(ini)
        location = parser.get("alembic", "script_location", fallback="alembic").replace("%(here)s", str(repo))
    except configparser.Error:
        return None
    versions = (repo / location / "versions") if not os.path.isabs(location) else Path(location) / "versions"
    revisions: Set[str] = set()
    parents: Set[str] = set()
    for path in sorted(versions.glob("*.py")) if versions.is_dir() else []:
        text = path.read_text(errors="replace")
        for key, value in _REVISION.findall(text):
            ids = set(re.findall(r"""['"]([0-9A-Za-z_]+)['"]""", value))
            (revisions if key == "revision" else parents).update(ids)
    return revisions - parents


def mismatches(code: Dict[str, Set[str]], database: Dict[str, Set[str]]) -> List[str]:
    """Where code and database are out of step, named, per framework both know."""
    out = []
    for name in sorted(set(code) & set(database)):
        have = database[name]
        if name == "django":  # the apps of Django itself and of installed packages are not in this code
            apps = {entry.split(" ", 1)[0] for entry in code[name]}
            have = {entry for entry in have if entry.split(" ", 1)[0] in apps}
        ahead = sorted(code[name] - have)
        behind = sorted(have - code[name])
        if name == "alembic":
            if code[name] != database[name]:
                out.append(f"alembic: the code's head is {', '.join(sorted(code[name])) or '(none)'}, the database is "
                           f"at {', '.join(sorted(database[name])) or '(base)'}")
            continue
        if ahead:
            out.append(f"{name}: the code expects {len(ahead)} migration(s) the database does not have: "
                       f"{', '.join(ahead[:5])}" + (" ..." if len(ahead) > 5 else ""))
        if behind:
            out.append(f"{name}: the database has {len(behind)} migration(s) the code does not know: "
                       f"{', '.join(behind[:5])}" + (" ..." if len(behind) > 5 else ""))
    return out
