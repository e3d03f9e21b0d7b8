"""What every script shares at its edges: settings and logs at start, confirmation, exit codes."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import psycopg2

from . import trust
from .env import Settings, load_settings
from .errors import EXIT_FAILED, ConfigError, NotConfirmed, RollbackError
from .log import console_only, get_logger, mask, register_secret, setup_logging
from .pg import connections, pgbouncer
from .pg.connections import DEFAULT_WAIT
from .pg.database import ConnInfo
from .pg.pgbouncer import DEFAULT_PAUSE_TIMEOUT
from .points import report, warm


@dataclass
class Context:
    """One run: its script name, settings, log file and the flags every script shares."""

    script: str
    settings: Settings
    log_path: Path
    yes: bool = False
    json: bool = False
    wait: float = DEFAULT_WAIT
    no_warm: bool = False
    pgbouncer_url: Optional[str] = None
    pause_timeout: Optional[float] = None
    no_services: bool = False

    @property
    def log(self):
        return get_logger()

    def services(self):
        """ROLLBACK_STOP_COMMAND / ROLLBACK_START_COMMAND around a destructive rollback (common.services)."""
        from .services import Services
        return Services(self.settings, skip=self.no_services)

    def code_commit(self) -> Optional[str]:
        """The commit checked out at REPO_PATH (recorded with a rollback point: the code that expects
        that database); None when REPO_PATH is unset or no repository."""
        repo = self.settings.get("REPO_PATH")
        if not repo:
            return None
        done = subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-C", repo,
                               "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, check=False)
        return done.stdout.strip() or None if done.returncode == 0 else None

    def conninfo(self, variable: str, override: Optional[str] = None) -> ConnInfo:
        url = override or self.settings.require(variable)
        return ConnInfo.parse(url, what=variable)

    def staging(self) -> ConnInfo:
        """STAGING_DATABASE_URL, refused when it names the V2 database: V2 is production, and nothing
        here may replace it, cut its connections or copy it with TEMPLATE (DESIGN §5)."""
        staging = self.conninfo("STAGING_DATABASE_URL")
        v2_url = self.settings.get("V2_DATABASE_URL")
        if v2_url and same_database(ConnInfo.parse(v2_url, what="V2_DATABASE_URL"), staging):
            raise ConfigError("STAGING_DATABASE_URL and V2_DATABASE_URL name the same database: refusing to touch "
                              "what may be production. Nothing was changed. Fix the URLs in "
                              f"{self.settings.env_file} or the environment.")
        self.repair(staging)
        return staging

    def repair(self, target: ConnInfo) -> None:
        """Before anything else: give back the connections a killed run left cut (DESIGN §5)."""
        try:
            pooler = self.pooler(target)
        except RollbackError:
            pooler = None
        connections.repair(target, self.settings.backup_dir, self.script, pooler)

    def db_target(self) -> ConnInfo:
        """database_rollback.py's target: the DB_* variables, or STAGING_DATABASE_URL without DB_NAME."""
        s = self.settings
        if not s.get("DB_NAME"):
            if s.get("STAGING_DATABASE_URL"):
                info = self.conninfo("STAGING_DATABASE_URL")
                self.repair(info)
                return info
            s.require("DB_NAME")
        try:
            port = int(s.get("DB_PORT") or 5432)
        except ValueError:
            raise ConfigError(f"DB_PORT must be a number (got {s.get('DB_PORT')!r})") from None
        info = ConnInfo(host=s.get("DB_HOST") or "localhost", port=port, dbname=s.require("DB_NAME"),
                        user=s.get("DB_USER"), password=s.get("DB_PASSWORD") or None)
        register_secret(info.password)
        self.repair(info)
        return info

    def confirm(self, action: str, details: List[str]) -> None:
        """Show what will be replaced and ask for 'yes' (DESIGN §3); --yes skips the question."""
        log = self.log
        log.info("%s", action)
        for line in details:
            log.info("  %s", line)
        if self.yes:
            log.info("Confirmed by --yes.")
            return
        if not sys.stdin.isatty():
            raise NotConfirmed("not confirmed: no terminal to ask on. Pass --yes to confirm. Nothing was changed.")
        try:
            import termios
            termios.tcflush(sys.stdin, termios.TCIFLUSH)  # only an answer typed after the question counts
        except (ImportError, OSError):
            pass
        try:
            answer = _ask("Type 'yes' to continue: ")
        except EOFError:
            answer = ""
        except KeyboardInterrupt:
            print()  # the message goes on a line of its own, not after the ^C
            raise NotConfirmed("declined (interrupted at the question). Nothing was changed.") from None
        if answer.strip().lower() != "yes":
            raise NotConfirmed("declined. Nothing was changed.")
        log.debug("confirmed at the prompt")

    def pooler(self, target: ConnInfo):
        """PgBouncer in front of the target (PGBOUNCER_ADMIN_URL / --pgbouncer-url), or None."""
        if self.pgbouncer_url:
            register_secret(ConnInfo.parse(self.pgbouncer_url, what="--pgbouncer-url").password)
        return pgbouncer.from_settings(self.settings, target.dbname, self.pgbouncer_url, self.pause_timeout)

    @property
    def warm_copies(self) -> int:
        """How many of a database's newest dump points keep a warm copy (0 with --no-warm)."""
        return 0 if self.no_warm else warm.keep_setting(self.settings.get("ROLLBACK_WARM_COPIES"))

    @property
    def keep_replaced(self) -> int:
        """ROLLBACK_KEEP_REPLACED: how many `__pre_rollback_` databases each database keeps (default 2)."""
        value = self.settings.get("ROLLBACK_KEEP_REPLACED")
        try:
            return 2 if value in (None, "") else max(0, int(value))
        except ValueError:
            raise ConfigError(f"ROLLBACK_KEEP_REPLACED must be a whole number (got {value!r})") from None

    @property
    def pg_bin_dir(self) -> Optional[str]:
        return self.settings.get("PG_BIN_DIR")

    def show_point(self, point) -> None:
        """A new or restored rollback point: JSON with --json, else the summary lines."""
        if self.json:
            self.emit_json(point.summary())
        else:
            for line in report.created_lines(point):
                self.log.info("%s", line)

    def emit_json(self, document) -> None:
        print(json.dumps(document, indent=2, sort_keys=True, default=str, ensure_ascii=False))


# Command-line options that override a variable of the environment (DESIGN §2).
OVERRIDES = {"backup_dir": "BACKUP_DIR", "log_dir": "LOG_DIR", "pg_bin_dir": "PG_BIN_DIR",
             "migrations_dir": "MIGRATIONS_DIR", "staging_url": "STAGING_DATABASE_URL", "v2_url": "V2_DATABASE_URL",
             "db_host": "DB_HOST", "db_port": "DB_PORT", "db_name": "DB_NAME", "db_user": "DB_USER",
             "repo_path": "REPO_PATH", "code_backup_dir": "CODE_BACKUP_DIR", "deployment_dir": "DEPLOYMENT_DIR",
             "config_dir": "CONFIG_DIR", "config_backup_dir": "CONFIG_BACKUP_DIR", "env_file": "ENV_FILE"}
_AREAS = {
    "database": [("--staging-url", "URL", "staging (default: $STAGING_DATABASE_URL; a password here shows in ps)"),
                 ("--v2-url", "URL", "V2 (default: $V2_DATABASE_URL; a password here shows in ps)"),
                 ("--backup-dir", "DIR", "rollback points folder (default: $BACKUP_DIR)"),
                 ("--pg-bin-dir", "DIR", "folder searched first for pg_dump/pg_restore (default: $PG_BIN_DIR)")],
    "code": [("--repo-path", "DIR", "the repository (default: $REPO_PATH)"),
             ("--code-backup-dir", "DIR", "(default: $CODE_BACKUP_DIR)"),
             ("--deployment-dir", "DIR", "releases and the current symlink (default: $DEPLOYMENT_DIR)")],
    "config": [("--config-dir", "DIR", "(default: $CONFIG_DIR)"), ("--config-backup-dir", "DIR", "(default: $CONFIG_BACKUP_DIR)"),
               ("--env-file", "FILE", "the .env file to back up and restore (default: $ENV_FILE)")],
}


def check_folders(settings: Settings) -> None:
    """Every folder the toolkit reads or writes (and PG_BIN_DIR's tools) must be the running user's
    or root's and not writable by others, before anything is read from it (DESIGN §3)."""
    for name in trust.FOLDER_SETTINGS:
        if settings.get(name):
            trust.check_folder(settings.path(name), name)


_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def same_database(a: ConnInfo, b: ConnInfo) -> bool:
    host = lambda h: "localhost" if h.lower() in _LOOPBACK else h.lower()  # noqa: E731
    return (host(a.host), a.port, a.dbname) == (host(b.host), b.port, b.dbname)


_DB_TARGET = [("--db-host", "HOST", "the target's host (default: $DB_HOST)"),
              ("--db-port", "PORT", "(default: $DB_PORT)"), ("--db-name", "NAME", "(default: $DB_NAME)"),
              ("--db-user", "USER", "(default: $DB_USER; the password only from $DB_PASSWORD)")]


def script_parser(prog: str, doc: Optional[str]) -> argparse.ArgumentParser:
    """A script's parser: its name, and its docstring (the commands it runs) as the description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def command_parser(prog: str, doc: Optional[str]):
    """A parser whose first argument is a required COMMAND: (parser, the subparsers to add them to)."""
    parser = script_parser(prog, doc)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    return parser, sub


def cleanup_command(sub, help_text: str = "remove backups older than DAYS (the newest stays)",
                    **flags) -> argparse.ArgumentParser:
    """`cleanup DAYS [--dry-run]`, with the script's common flags (keyword arguments of common_flags)."""
    p = sub.add_parser("cleanup", help=help_text)
    p.add_argument("days", type=float)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    common_flags(p, **flags)
    return p


def common_flags(parser: argparse.ArgumentParser, destructive: bool = True, machine: bool = False,
                 area: str = "database", db_target: bool = False) -> None:
    """The flags every script shares (--yes, --json, --verbose) and the variable overrides of its area."""
    if destructive:
        parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    if machine:
        parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="show DEBUG lines on the console too")
    parser.add_argument("--log-dir", metavar="DIR", help="run logs folder (default: $LOG_DIR)")
    for flag, metavar, text in _AREAS.get(area, []):
        parser.add_argument(flag, metavar=metavar, help=text)
    if db_target:  # database_rollback.py's own target (DESIGN §2); no other script reads these
        for flag, metavar, text in _DB_TARGET:
            parser.add_argument(flag, metavar=metavar, help=text)
    if area == "database" and destructive:
        parser.add_argument("--pgbouncer-url", metavar="URL",
                            help="PgBouncer's admin console: clients pause instead of failing during the swap "
                                 "(default: $PGBOUNCER_ADMIN_URL; a password here shows in ps)")
        parser.add_argument("--pause-timeout", metavar="SECONDS", type=float,
                            help=f"longest PgBouncer pause (default {DEFAULT_PAUSE_TIMEOUT:.0f})")
    if area == "database" and destructive:
        parser.add_argument("--no-services", action="store_true",
                            help="do not run ROLLBACK_STOP_COMMAND / ROLLBACK_START_COMMAND around this restore")
        parser.add_argument("--wait", metavar="SECONDS", type=float, default=DEFAULT_WAIT,
                            help="how long to wait for sessions this role may not cut before giving up "
                                 f"(default {DEFAULT_WAIT:.0f})")


def yes_flag(parser: argparse.ArgumentParser) -> None:
    """--yes for a command that makes a point: a server-side snapshot cuts the database's sessions,
    and asks first (DESIGN §4: making a point never cuts a client unasked)."""
    parser.add_argument("-y", "--yes", action="store_true",
                        help="cut the database's sessions without asking when a server-side snapshot needs it")
    parser.add_argument("--wait", metavar="SECONDS", type=float, default=DEFAULT_WAIT,
                        help="how long to wait for sessions this role may not cut before giving up "
                             f"(default {DEFAULT_WAIT:.0f})")


def warm_flag(parser: argparse.ArgumentParser, making: bool) -> None:
    """--no-warm: for a command that makes a dump point, or one that restores one."""
    parser.add_argument("--no-warm", action="store_true",
                        help="make no warm copy of the new point (also: ROLLBACK_WARM_COPIES=0)" if making else
                        "restore from the dump even when the point has a warm copy")


def execute(script: str, parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace, Context], Optional[int]],
            argv: Optional[List[str]] = None) -> int:
    """Parse, load settings, start the log, run the handler, turn errors into exit codes."""
    args = parser.parse_args(argv)
    log = get_logger()
    log_path = Path("-")
    try:
        settings = load_settings(**{var: getattr(args, attr) for attr, var in OVERRIDES.items()
                                    if getattr(args, attr, None)})
        machine = bool(getattr(args, "json", False))
        log_path = setup_logging(script, settings.log_dir, verbose=getattr(args, "verbose", False),
                                 machine_output=machine)
        if script != "check_configuration":  # the configuration check reports every folder itself
            check_folders(settings)
        ctx = Context(script, settings, log_path, yes=getattr(args, "yes", False), json=machine,
                      wait=max(0.0, DEFAULT_WAIT if getattr(args, "wait", None) is None else args.wait),
                      no_warm=bool(getattr(args, "no_warm", False)),
                      pgbouncer_url=getattr(args, "pgbouncer_url", None),
                      pause_timeout=getattr(args, "pause_timeout", None),
                      no_services=bool(getattr(args, "no_services", False)))
        code = handler(args, ctx)
        return 0 if code is None else code
    except RollbackError as exc:
        _ensure_console()
        log.error("error: %s", exc)
        log.error("log: %s", log_path)
        return exc.exit_code
    except psycopg2.OperationalError as exc:  # the server went away in the middle of the work
        _ensure_console()
        log.debug("%s", traceback.format_exc())
        log.error("error: lost the connection to the database server (%s). Every step here is either done "
                  "whole or not at all: run the same command again once the server is back; it finishes "
                  "or cleans up what this run began.", mask(str(exc).strip().splitlines()[0] if str(exc).strip() else
                                                            type(exc).__name__))
        log.error("log: %s", log_path)
        return EXIT_FAILED
    except KeyboardInterrupt:
        _ensure_console()
        print(file=sys.stderr)
        log.error("interrupted. Every step here is done whole or not at all: a step cut short changed nothing, and "
                  "the log says which steps had finished: %s", log_path)
        return 130
    except Exception as exc:  # a bug: one line for the operator, the traceback in the log
        _ensure_console()
        log.debug("%s", traceback.format_exc())
        log.error("unexpected error: %s: %s. Details: %s", type(exc).__name__, mask(str(exc)), log_path)
        return EXIT_FAILED


def _ensure_console() -> None:
    if not get_logger().handlers:
        console_only()


def dispatch(commands: dict) -> Callable[[argparse.Namespace, Context], Optional[int]]:
    """A handler that runs the subcommand's function: commands[args.command](args, ctx)."""
    return lambda args, ctx: commands[args.command](args, ctx)


def main(script: str, parser: argparse.ArgumentParser, handler) -> None:
    """Run a script: a handler function, or a dict of subcommand functions."""
    sys.exit(execute(script, parser, dispatch(handler) if isinstance(handler, dict) else handler))


def _ask(prompt: str) -> str:
    """input(), but a Ctrl-C that lands just before input() starts reading still interrupts: Python
    acts on a signal between its own steps, and input() may already be blocked reading the terminal,
    waiting for a line (the likely cause of a CI run where quick_rollback did not end after a Ctrl-C
    at this question). The terminal is polled instead, so Python sees the signal within 0.2 s."""
    import select
    sys.stdout.write(prompt)
    sys.stdout.flush()
    try:
        while not select.select([sys.stdin], [], [], 0.2)[0]:
            pass
    except (OSError, ValueError):  # no select on this stdin: input()'s own read
        return input()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")
