"""The documents' key metrics after a rollback: error rate, response time, CPU and memory, each
against its alert threshold (error rate > 1 %, response time > 500 ms, CPU > 80 %, memory > 80 %;
overridable in .env).

Each metric says whose it is. Error rate and response time are the database's. CPU and memory are
the database server's own processes when it runs on this machine (its postmaster found by our
backend's parent, and proven by its start time), measured with psutil; this machine's load is shown
beside them. A loaded machine whose load is not the server's, or a database that runs elsewhere,
makes the verdict "unknown", never "not OK": the toolkit's machine is not the database."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import ConfigError
from . import database as db
from .database import ConnInfo

try:
    import psutil
except ImportError:  # a machine with only Python (no wheels): this machine's load is not measured
    psutil = None

# name -> (variable that overrides it, default threshold, unit)
THRESHOLDS: Dict[str, Tuple[str, float, str]] = {
    "error_rate": ("ROLLBACK_MAX_ERROR_RATE", 1.0, "%"),
    "response_ms": ("ROLLBACK_MAX_RESPONSE_MS", 500.0, "ms"),
    "cpu_percent": ("ROLLBACK_MAX_CPU_PERCENT", 80.0, "%"),
    "memory_percent": ("ROLLBACK_MAX_MEMORY_PERCENT", 80.0, "%"),
}


@dataclass
class Health:
    error_rate: float = 0.0     # percent of the database's transactions rolled back in the window
    response_ms: float = 0.0    # median latency of a probe query
    cpu_percent: Optional[float] = None     # the server's processes (None: not measured from here)
    memory_percent: Optional[float] = None
    machine_cpu_percent: Optional[float] = None  # this machine, whatever runs on it
    machine_memory_percent: Optional[float] = None
    host: str = ""              # where the server's processes were found, or why not
    window_seconds: float = 0.0
    problems: List[str] = field(default_factory=list)
    unknown: List[str] = field(default_factory=list)  # what cannot be judged from here, and why

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "not OK" if self.problems else "unknown" if self.unknown else "OK"

    def line(self) -> str:
        server = (f"server processes CPU {self.cpu_percent:.0f} %, memory {self.memory_percent:.0f} %"
                  if self.cpu_percent is not None else "server processes not measured")
        machine = (f"this machine CPU {self.machine_cpu_percent:.0f} %, memory {self.machine_memory_percent:.0f} %"
                   if self.machine_cpu_percent is not None else "this machine not measured")
        verdict = "OK" if self.verdict == "OK" else "; ".join(self.problems) if self.problems else \
            "unknown: " + "; ".join(self.unknown)
        return (f"database: error rate {self.error_rate:.2f} %, response {self.response_ms:.1f} ms; {server} "
                f"({self.host}); {machine}; over {self.window_seconds:.0f} s: {verdict}")

    def to_json(self) -> dict:
        def r(v):
            return None if v is None else round(v, 1)
        return {"error_rate": round(self.error_rate, 3), "response_ms": round(self.response_ms, 2),
                "cpu_percent": r(self.cpu_percent), "memory_percent": r(self.memory_percent),
                "machine_cpu_percent": r(self.machine_cpu_percent),
                "machine_memory_percent": r(self.machine_memory_percent), "host": self.host,
                "window_seconds": self.window_seconds, "ok": self.ok, "verdict": self.verdict,
                "problems": self.problems, "unknown": self.unknown}


def thresholds(settings) -> Dict[str, float]:
    found = {}
    for name, (variable, default, _) in THRESHOLDS.items():
        value = settings.get(variable)
        try:
            found[name] = default if value in (None, "") else float(value)
        except ValueError:
            raise ConfigError(f"{variable} must be a number (got {value!r})") from None
    return found


def server_processes(conn) -> Tuple[Optional[list], str]:
    """The server's postmaster and its children when they run on this machine: our backend's
    parent, whose start time is the server's own pg_postmaster_start_time() (a pid alone could
    be another machine's, or another container's). Returns (processes or None, whose they are)."""
    if psutil is None:
        return None, "psutil is not installed: not measured"
    pid, started = db.rows(conn, "SELECT pg_backend_pid(), extract(epoch FROM pg_postmaster_start_time())")[0]
    try:
        backend_start = db.scalar(conn, "SELECT extract(epoch FROM backend_start) FROM pg_stat_activity "
                                        "WHERE pid = pg_backend_pid()")
        backend = psutil.Process(int(pid))
        postmaster = backend.parent()
        # our own backend (its start time) under the server's postmaster (its start time and name)
        if postmaster is not None and backend_start is not None \
                and abs(backend.create_time() - float(backend_start)) < 2 \
                and abs(postmaster.create_time() - float(started)) < 5 \
                and any(word in " ".join(postmaster.cmdline() or [postmaster.name()]) for word in ("postgres", "postmaster")):
            return [postmaster] + postmaster.children(), f"PostgreSQL pid {postmaster.pid} on this machine"
    except psutil.Error:
        pass
    return None, "the server runs on another machine (or out of this one's sight): not measured from here"


def _cpu_seconds(processes: list) -> Dict[int, float]:
    """CPU seconds of each process; the postmaster's (the first) with those of its children that
    ended, so that short-lived connections count too."""
    found = {}
    for i, proc in enumerate(processes):
        try:
            times = proc.cpu_times()
            found[proc.pid] = times.user + times.system + (
                getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0) if i == 0 else 0.0)
        except psutil.Error:
            pass
    return found


def _memory_of(processes: list) -> float:
    """Percent of this machine's memory: each process's private memory, and the shared memory
    (shared_buffers) once."""
    private, shared = 0, 0
    for proc in processes:
        try:
            mem = proc.memory_info()
        except psutil.Error:
            continue
        private += max(0, mem.rss - getattr(mem, "shared", 0))
        shared = max(shared, getattr(mem, "shared", 0))
    return 100.0 * (private + shared) / psutil.virtual_memory().total


def _xacts(conn, dbname: str) -> Tuple[int, int]:
    row = db.rows(conn, "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,))
    return (int(row[0][0]), int(row[0][1])) if row else (0, 0)


def sample(info: ConnInfo, limits: Dict[str, float], window: float = 2.0) -> Health:
    """Measure over `window` seconds: rolled-back share of the database's transactions (from
    pg_stat_database deltas), a probe query's latency, the server processes' CPU and memory when
    they are local, and this machine's (see the module's text for whose counts)."""
    health = Health(window_seconds=window)
    conn = db.connect(info, app="rollback-toolkit/health")
    try:
        processes, health.host = server_processes(conn)
        commits0, rollbacks0 = _xacts(conn, info.dbname)
        cpu0 = _cpu_seconds(processes) if processes else {}
        if psutil is not None:
            psutil.cpu_percent(interval=None)
        started_window = time.monotonic()
        latencies = []
        deadline = started_window + window
        while True:
            started = time.perf_counter()
            db.scalar(conn, "SELECT 1")
            latencies.append((time.perf_counter() - started) * 1000)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        db.scalar(conn, "SELECT pg_stat_clear_snapshot()")  # fresh counters, not this transaction's cached ones
        commits1, rollbacks1 = _xacts(conn, info.dbname)
        elapsed = time.monotonic() - started_window
        if processes:
            now = processes[:1] + _children(processes[0])
            cpu1 = _cpu_seconds(now)
            used = sum(cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1)
            health.cpu_percent = 100.0 * used / (elapsed * (psutil.cpu_count() or 1))
            health.memory_percent = _memory_of(now)
        if psutil is not None:
            health.machine_cpu_percent = psutil.cpu_percent(interval=None)
            health.machine_memory_percent = psutil.virtual_memory().percent
    finally:
        conn.close()
    done = (commits1 - commits0) + (rollbacks1 - rollbacks0)
    health.error_rate = 100.0 * (rollbacks1 - rollbacks0) / done if done > 0 else 0.0
    health.response_ms = statistics.median(latencies)
    _judge(health, limits)
    return health


def _children(postmaster) -> list:
    try:
        return postmaster.children()
    except psutil.Error:
        return []


def _judge(health: Health, limits: Dict[str, float]) -> None:
    """The database's own metrics over their limits are problems; this machine's load is one only
    where it is the server's processes'."""
    def over(name: str, value: Optional[float]) -> bool:
        return value is not None and name in limits and value > limits[name]

    def text(name: str, value: float) -> str:
        unit = THRESHOLDS[name][2]
        return f"{value:.1f}{unit} is over {limits[name]:g}{unit}"

    for name in ("error_rate", "response_ms"):
        if over(name, getattr(health, name)):
            health.problems.append(f"{name.replace('_', ' ')} {text(name, getattr(health, name))}")
    for name, label in (("cpu_percent", "CPU"), ("memory_percent", "memory")):
        server, machine = getattr(health, name), getattr(health, f"machine_{name}")
        if over(name, server):
            health.problems.append(f"the server processes' {label} {text(name, server)}")
        elif over(name, machine):
            whose = "not the server processes'" if server is not None else "the database's server is not measured"
            health.unknown.append(f"this machine's {label} {text(name, machine)} ({whose})")


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
