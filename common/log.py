"""Run logs: one file per run at DEBUG, INFO on the console, passwords masked everywhere."""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

LOGGER_NAME = "rollback"
# Up to the last '@' of the word: a password may hold '@' (and ':' '/' '#') when it was not encoded.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>\S+)(?P<at>@)")
_PASSWORD_KV = re.compile(r"(?i)(?P<head>\b[A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN)[A-Z0-9_]*\s*[=:]\s*)(?P<pw>\S+)")
_secrets: set = set()


def register_secret(secret: Optional[str]) -> None:
    """Mask this exact string in every log record from now on."""
    if secret and len(secret) >= 3:
        _secrets.add(secret)


def mask(text: str) -> str:
    """Hide passwords: those registered, those in URLs and in NAME_PASSWORD=value pairs."""
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + "***" + m.group("at"), text)
    return _PASSWORD_KV.sub(lambda m: m.group("head") + "***", text)


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def console_only(verbose: bool = False, machine_output: bool = False) -> logging.Logger:
    """The console handlers alone (also the fallback before settings are known)."""
    logger = get_logger()
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    # Results and progress go to stdout, warnings and errors to stderr; with --json stdout
    # carries only the JSON document, so everything logged goes to stderr.
    out = logging.StreamHandler(sys.stderr if machine_output else sys.stdout)
    out.setLevel(logging.DEBUG if verbose else logging.INFO)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_MaskingFormatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def setup_logging(script: str, log_dir: Path, verbose: bool = False, machine_output: bool = False) -> Path:
    """Start this run's log file `<log_dir>/<script>_<YYYYmmdd_HHMMSS>.log` and the console."""
    logger = console_only(verbose, machine_output)

    from .trust import ensure_folder  # refuses a LOG_DIR another user could write, or a link
    log_path = log_dir / f"{script}_{time.strftime('%Y%m%d_%H%M%S')}.log"
    ensure_folder(log_dir, "LOG_DIR")
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        stream = os.fdopen(fd, "a", encoding="utf-8")
        file_handler = logging.StreamHandler(stream)
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(_MaskingFormatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file_handler)
    except OSError as exc:
        logger.warning("cannot write the log file %s (%s); logging to the console only", log_path, exc.strerror)
    logger.debug("command line: %s", " ".join(sys.argv))
    return log_path
