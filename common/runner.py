"""The one door for subprocesses: argument lists, password in the environment, stderr logged."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable, Mapping, Optional, Sequence, Union

from .errors import ToolFailed
from .log import get_logger, mask, register_secret


def _die_with_parent() -> None:
    """In the child: be killed when the toolkit dies, so no orphaned pg_dump or pg_restore goes on
    writing after a kill of the script (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Process:
    """A started child whose stderr is read line by line into the log (and an optional callback)."""

    def __init__(self, argv: Sequence[str], *, password: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, stdout: Union[None, IO, int] = None,
                 on_stderr_line: Optional[Callable[[str], None]] = None,
                 user: Optional[str] = None, group: Optional[str] = None, cwd: Optional[str] = None,
                 stdin: Union[None, IO, int] = None):
        self.argv = [str(a) for a in argv]
        self.log = get_logger()
        child_env = dict(os.environ)
        child_env.pop("PGPASSWORD", None)
        child_env.setdefault("PGCONNECT_TIMEOUT", "10")
        if env:
            child_env.update({k: str(v) for k, v in env.items()})
        if password:
            register_secret(password)
            # libpq reads PGPASSWORD: the password never appears in argv (visible to `ps`).
            child_env["PGPASSWORD"] = password
        self.log.debug("run: %s", mask(" ".join(self.argv)))
        extra = {}
        if user is not None:
            extra = {"user": user, "group": group, "extra_groups": []}
        # umask 077: files a child writes (dumps) are readable by their owner only.
        self.started = time.monotonic()
        self._stderr_lines: list = []
        self._on_line = on_stderr_line
        self.proc = subprocess.Popen(
            self.argv, env=child_env, cwd=cwd, stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE, umask=0o077,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") and user is None else None, **extra)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._stderr_lines.append(line)
            self.log.debug("  %s", line)
            if self._on_line:
                try:
                    self._on_line(line)
                except Exception:  # a progress display must never break the operation
                    self.log.debug("progress callback failed", exc_info=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait(self, check: bool = True, what: Optional[str] = None, timeout: Optional[float] = None) -> Result:
        try:
            out = self.proc.stdout.read() if self.proc.stdout is not None else b""
            self.proc.wait(timeout=timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            self._reader.join(timeout=5)
        seconds = time.monotonic() - self.started
        stderr = "\n".join(self._stderr_lines)
        result = Result(self.argv, self.proc.returncode, (out or b"").decode("utf-8", "replace"), stderr, seconds)
        self.log.debug("exit %s after %.2fs: %s", result.returncode, seconds, os.path.basename(self.argv[0]))
        if check and result.returncode != 0:
            name = what or os.path.basename(self.argv[0])
            raise ToolFailed(f"{name} failed (exit {result.returncode}): {last_error_line(stderr)}",
                             result.returncode, stderr)
        return result


def run(argv: Sequence[str], *, check: bool = True, what: Optional[str] = None,
        timeout: Optional[float] = None, **kwargs) -> Result:
    """Run a child to the end; a non-zero exit raises ToolFailed (unless check=False)."""
    return Process(argv, **kwargs).wait(check=check, what=what, timeout=timeout)


def last_error_line(stderr: str) -> str:
    """The most telling line of a tool's stderr: its last 'error:' line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error:" in line.lower() or "fatal:" in line.lower():
            return mask(line)
    return mask(lines[-1]) if lines else "(no message)"
