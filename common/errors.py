"""Errors a user can read, each mapped to one exit code (DESIGN §3)."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DECLINED = 3
EXIT_VERIFY = 4


class RollbackError(Exception):
    """Base class: the message says what happened, whether anything changed, what to do."""

    exit_code = EXIT_FAILED


class ConfigError(RollbackError):
    """A missing or malformed setting or argument."""

    exit_code = EXIT_USAGE


class UsageError(RollbackError):
    exit_code = EXIT_USAGE


class NotConfirmed(RollbackError):
    exit_code = EXIT_DECLINED


class ConnectionFailed(RollbackError):
    pass


class ToolNotFound(RollbackError):
    """No client tool of a usable major version was found."""


class ToolFailed(RollbackError):
    """A client tool (pg_dump, pg_restore, psql) exited non-zero."""

    def __init__(self, message: str, returncode: int = 1, stderr: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class ToolVersionMismatch(ToolFailed):
    pass


class BackupFailed(RollbackError):
    pass


class BackupCorrupt(RollbackError):
    pass


class RestoreFailed(RollbackError):
    pass


class LockHeld(RollbackError):
    pass


class VerifyProblems(RollbackError):
    exit_code = EXIT_VERIFY
