"""A test-only pause at named steps, so tests can kill a run, or stop its server, at an exact point.

With ROLLBACK_TEST_PAUSE_AT="<step>:<file>" a run that reaches <step> writes its pid to <file>
and waits (up to 5 minutes) until the test removes the file, then goes on. With
ROLLBACK_TEST_FAIL_AT="<step>" the run fails there, as a step that raised would. Unset,
checkpoint() does nothing."""
from __future__ import annotations

import os
import time

VARIABLE = "ROLLBACK_TEST_PAUSE_AT"
FAIL_VARIABLE = "ROLLBACK_TEST_FAIL_AT"


class InjectedFailure(RuntimeError):
    pass


def checkpoint(step: str) -> None:
    if os.environ.get(FAIL_VARIABLE) == step:
        raise InjectedFailure(f"test failure injected at {step}")
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    for item in spec.split(";"):  # several "<step>:<file>" pairs may be given
        wanted, _, path = item.partition(":")
        if wanted == step and path:
            _pause(path)


def _pause(path: str) -> None:
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    deadline = time.monotonic() + 300
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
