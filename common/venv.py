"""The scripts' first step: run under the Python that has the toolkit's requirements.

`./setup_and_run.sh` installs requirements.txt into the system Python, or into .venv where pip may
not write there (an externally managed Python, an ordinary user). So `python3 quick_rollback.py`
works as the README prints it either way: when this Python lacks the requirements and the
toolkit's .venv has them, the script runs itself again under .venv's Python. Imports nothing of
the toolkit's (they need the requirements)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"psycopg2": "psycopg2-binary", "dotenv": "python-dotenv", "yaml": "PyYAML"}
_AGAIN = "ROLLBACK_TOOLKIT_REEXEC"


def ensure() -> None:
    missing = [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return
    venv_python = ROOT / ".venv" / "bin" / "python"
    # By its prefix, not its path: .venv/bin/python is a link to the very interpreter it runs.
    in_venv = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()
    if venv_python.exists() and not os.environ.get(_AGAIN) and not in_venv:
        os.environ[_AGAIN] = "1"
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    sys.stderr.write(f"error: {', '.join(missing)} not installed for {sys.executable}. Run ./setup_and_run.sh 1 in "
                     f"{ROOT} (it installs requirements.txt, into .venv where pip may not write), then run this "
                     "again. Nothing was changed.\n")
    sys.exit(2)
