"""The documents' Recovery Steps 1 and 4: stop the affected services, restart them.

ROLLBACK_STOP_COMMAND and ROLLBACK_START_COMMAND are shell commands (`systemctl stop app`). When
they are set, every destructive rollback runs them: `restore --all`, `quick_rollback.py`,
`reset_staging.py` and the other restores (`--no-services` leaves them out for one run). The stop
command runs after the confirmation and before anything changes; when it fails, nothing is changed
and the rollback does not start. The start command runs after the last step, and also when a step
failed; the output says on which state the services came back. Both commands' output goes to the
log; their times are steps of the summary and of --json. Each may take ROLLBACK_SERVICE_TIMEOUT
seconds (default 300)."""
from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

from .errors import RollbackError
from .log import get_logger, mask

DEFAULT_TIMEOUT = 300.0


class StopFailed(RollbackError):
    exit_code = 1


@dataclass
class Step:
    name: str  # "stop" or "start"
    seconds: float
    ok: bool
    detail: str = ""

    def line(self) -> str:
        verb = {"stop": "stopped", "start": "started"}[self.name]
        if self.ok:
            return f"services {verb} in {self.seconds:.1f} s (ROLLBACK_{self.name.upper()}_COMMAND)" + \
                (f"; {self.detail}" if self.detail else "")
        return f"services NOT {verb}: ROLLBACK_{self.name.upper()}_COMMAND failed after {self.seconds:.1f} s ({self.detail})"

    def to_json(self) -> dict:
        return {"step": f"services {self.name}", "seconds": round(self.seconds, 3), "ok": self.ok,
                "detail": self.detail or None}


def _run(name: str, command: str, timeout: float) -> Step:
    log = get_logger()
    log.info("Services: running ROLLBACK_%s_COMMAND ...", name.upper())
    started = time.monotonic()
    try:
        done = subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, encoding="utf-8", errors="replace", timeout=timeout)
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
    seconds = time.monotonic() - started
    for line in output.splitlines()[-200:]:
        log.debug("  %s command | %s", name, mask(line))
    if code == 0:
        return Step(name, seconds, True)
    last = mask(output.strip().splitlines()[-1]) if output.strip() else "no output"
    why = f"timed out after {timeout:.0f} s" if code is None else f"exit {code}"
    return Step(name, seconds, False, f"{why}: {last}")


class Services:
    """What a rollback does around its steps; inactive when neither command is set or skipped."""

    def __init__(self, settings, skip: bool = False):
        self.stop_command = None if skip else (settings.get("ROLLBACK_STOP_COMMAND") or "").strip() or None
        self.start_command = None if skip else (settings.get("ROLLBACK_START_COMMAND") or "").strip() or None
        try:
            self.timeout = float(settings.get("ROLLBACK_SERVICE_TIMEOUT") or DEFAULT_TIMEOUT)
        except ValueError:
            raise RollbackError("ROLLBACK_SERVICE_TIMEOUT must be a number of seconds. Nothing was changed.") from None
        self.steps: List[Step] = []

    @property
    def active(self) -> bool:
        return bool(self.stop_command or self.start_command)

    def describe(self) -> List[str]:
        if not self.active:
            return []
        stop = "stopped first (ROLLBACK_STOP_COMMAND)" if self.stop_command else "not stopped"
        start = ("started again after the last step, also when one failed (ROLLBACK_START_COMMAND)"
                 if self.start_command else "not started again")
        return [f"services:       {stop}, {start}"]

    @contextmanager
    def around(self, state: Callable[[Optional[BaseException]], str]) -> Iterator["Services"]:
        """Stop, run the block, start (whatever happened; `state(exception or None)` says on what).
        A failing stop raises StopFailed before the block runs: nothing changed."""
        log = get_logger()
        if self.stop_command:
            step = _run("stop", self.stop_command, self.timeout)
            self.steps.append(step)
            if not step.ok:
                log.error("error: %s", step.line())
                self._start(log, "as they were: the rollback did not start")
                raise StopFailed(f"the services could not be stopped ({step.detail}); the rollback did not start. "
                                 "Nothing was changed.")
            log.info("  %s", step.line())
        try:
            yield self
        except BaseException as exc:
            self._start(log, state(exc))
            raise
        self._start(log, state(None))

    def _start(self, log, state: str) -> None:
        if not self.start_command:
            return
        step = _run("start", self.start_command, self.timeout)
        step.detail = (step.detail + "; " if step.detail else "") + f"on {state}"
        self.steps.append(step)
        (log.info if step.ok else log.error)("  %s", step.line())

    def lines(self) -> List[str]:
        return [step.line() for step in self.steps]

    def to_json(self) -> Optional[list]:
        return [step.to_json() for step in self.steps] if self.steps else None
