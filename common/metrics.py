"""The documents' key metrics after a rollback: error rate, response time, CPU and memory, each
against its alert threshold (error rate > 1 %, response time > 500 ms, CPU > 80 %, memory > 80 %;
overridable in .env)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import database as db
from .database import ConnInfo
from .errors import ConfigError

# name -> (variable that overrides it, default threshold, unit)
THRESHOLDS: Dict[str, Tuple[str, float, str]] = {
    "error_rate": ("ROLLBACK_MAX_ERROR_RATE", 1.0, "%"),
    "response_ms": ("ROLLBACK_MAX_RESPONSE_MS", 500.0, "ms"),
    "cpu_percent": ("ROLLBACK_MAX_CPU_PERCENT", 80.0, "%"),
    "memory_percent": ("ROLLBACK_MAX_MEMORY_PERCENT", 80.0, "%"),
}
_LOCAL = {"localhost", "127.0.0.1", "::1"}


@dataclass
class Health:
    error_rate: float = 0.0     # percent of transactions rolled back in the window
    response_ms: float = 0.0    # median latency of a probe query
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    host: str = ""              # whose CPU and memory these are
    window_seconds: float = 0.0
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return (f"error rate {self.error_rate:.2f} %, response {self.response_ms:.1f} ms, CPU {self.cpu_percent:.0f} %, "
                f"memory {self.memory_percent:.0f} % ({self.host}) over {self.window_seconds:.0f} s: "
                + ("OK" if self.ok else "; ".join(self.problems)))

    def to_json(self) -> dict:
        return {"error_rate": round(self.error_rate, 3), "response_ms": round(self.response_ms, 2),
                "cpu_percent": round(self.cpu_percent, 1), "memory_percent": round(self.memory_percent, 1),
                "host": self.host, "window_seconds": self.window_seconds, "ok": self.ok, "problems": self.problems}


def thresholds(settings) -> Dict[str, float]:
    found = {}
    for name, (variable, default, _) in THRESHOLDS.items():
        value = settings.get(variable)
        try:
            found[name] = default if value in (None, "") else float(value)
        except ValueError:
            raise ConfigError(f"{variable} must be a number (got {value!r})") from None
    return found


def _cpu_times() -> Tuple[int, int]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


def _memory_percent() -> float:
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    return 100.0 * (1 - info.get("MemAvailable", info.get("MemFree", 0)) / info["MemTotal"])


def _xacts(conn, dbname: str) -> Tuple[int, int]:
    row = db.rows(conn, "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,))
    return (int(row[0][0]), int(row[0][1])) if row else (0, 0)


def sample(info: ConnInfo, limits: Dict[str, float], window: float = 2.0) -> Health:
    """Measure over `window` seconds: rolled-back share of the database's transactions (from
    pg_stat_database deltas), a probe query's latency, this machine's CPU and memory."""
    local = info.host in _LOCAL or info.host.startswith("/")
    health = Health(host="this machine, the database host" if local else
                    f"this machine; the database host {info.host} is not measured from here",
                    window_seconds=window)
    conn = db.connect(info, app="rollback-toolkit/health")
    try:
        commits0, rollbacks0 = _xacts(conn, info.dbname)
        total0, idle0 = _cpu_times()
        latencies = []
        deadline = time.monotonic() + window
        while True:
            started = time.perf_counter()
            db.scalar(conn, "SELECT 1")
            latencies.append((time.perf_counter() - started) * 1000)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        db.scalar(conn, "SELECT pg_stat_clear_snapshot()")  # fresh counters, not this transaction's cached ones
        commits1, rollbacks1 = _xacts(conn, info.dbname)
        total1, idle1 = _cpu_times()
    finally:
        conn.close()
    done = (commits1 - commits0) + (rollbacks1 - rollbacks0)
    health.error_rate = 100.0 * (rollbacks1 - rollbacks0) / done if done > 0 else 0.0
    health.response_ms = statistics.median(latencies)
    health.cpu_percent = 100.0 * (1 - (idle1 - idle0) / (total1 - total0)) if total1 > total0 else 0.0
    health.memory_percent = _memory_percent()
    for name, limit in limits.items():
        value = getattr(health, name)
        if value > limit:
            health.problems.append(f"{name.replace('_', ' ')} {value:.1f}{THRESHOLDS[name][2]} is over "
                                   f"{limit:g}{THRESHOLDS[name][2]}")
    return health


def monitor(info: ConnInfo, limits: Dict[str, float], seconds: float, on_sample, window: float = 5.0) -> Health:
    """Watch for `seconds`, a sample every `window` seconds (each printed); any crossing counts."""
    seen: List[str] = []
    last: Optional[Health] = None
    deadline = time.monotonic() + max(seconds, window)
    while time.monotonic() < deadline:
        last = sample(info, limits, min(window, max(1.0, deadline - time.monotonic())))
        on_sample(last)
        seen += [p for p in last.problems if p not in seen]
    assert last is not None
    last.problems = seen
    last.window_seconds = seconds
    return last
