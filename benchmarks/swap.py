#!/usr/bin/env python3
"""Rollback in constant time (issue 32): how long until staging serves the point, at several sizes,
with the warm copy swapped in, against what a copy of the same database costs.

    python3 benchmarks/swap.py --sizes 100MB,1GB,3GB [--major 15] [--runs 3] [--out FILE]

Same throwaway server and generated data as benchmarks/run.py (fsync on, the OS page cache dropped
before each step when root). Per size and run: a rollback point (dump + warm copy); a migration
(a marker table); then `quick_rollback.py --yes` while a watcher connects to staging every 5 ms.
Measured from the start of the process (Python's start included):
  - served: the first moment a new connection to staging sees the point's data (no marker table);
  - unavailable: from the watcher's last answer with the migrated state to its first with the point
    (and, apart, the longest stretch without any answer over the whole run, the re-arm included);
  - warm again: when the process ended, the point re-armed from its dump.
Beside them, on the same data: a server-side copy of the warm copy (CREATE DATABASE ... TEMPLATE
... STRATEGY FILE_COPY, what the rollback did before), `pg_restore -j 2` of the point's dump into
a new database, and DSLR's restore (when it installs). Medians, and a plot of time against size."""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import aux_environment, cold_cache, generate, parse_size, rusage_run  # noqa: E402

from common.pg.database import connect, drop_database, execute  # noqa: E402
from common.progress import human_size  # noqa: E402
from common.testing.testserver import ThrowawayServer  # noqa: E402

STAGING = "bench_staging"


class Watcher:
    """A new connection to staging every 5 ms: when did it first see the point's data (no marker
    table), and what was the longest stretch without an answer from either state?"""

    def __init__(self, info, started: float):
        self.info, self.started = info, started
        self.served = None
        # The swap: from the last answer of the migrated state to the first with the point's data.
        self.swap_gap = None
        self.swap_closing_attempt = 0.0  # how long the first answer with the point took (connect + query)
        # Over the whole run, the re-arm included: the longest stretch without any answer. Measured on
        # 3.1 GB, this was a connection slowed by the re-arm's load 17 s after the swap, not the swap.
        self.longest_gap = 0.0
        self.closing_attempt = 0.0  # how long the answer that ended the longest gap took (connect + query)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psycopg2
        last_answer = time.monotonic()
        last_migrated = None
        while not self.stop.is_set():
            attempt = time.monotonic()
            try:
                conn = psycopg2.connect(host=self.info.host, port=self.info.port, user=self.info.user,
                                        password=self.info.password, dbname=STAGING, connect_timeout=2)
                try:
                    cur = conn.cursor()
                    cur.execute("SELECT to_regclass('public.bench_migrated') IS NULL")
                    point = cur.fetchone()[0]
                finally:
                    conn.close()
                now = time.monotonic()
                if now - last_answer > self.longest_gap:
                    self.longest_gap, self.closing_attempt = now - last_answer, now - attempt
                last_answer = now
                if not point:
                    last_migrated = now
                elif self.served is None:
                    self.served = now - self.started
                    if last_migrated is not None:
                        self.swap_gap, self.swap_closing_attempt = now - last_migrated, now - attempt
            except psycopg2.Error:
                pass
            time.sleep(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def quiet(admin) -> None:
    execute(admin, "CHECKPOINT")
    cold_cache()


def measure(server, work: Path, size: int, runs: int, dslr, record, peers: bool = True) -> int:
    info, bindir = server.info, server.bindir
    admin = connect(info)
    actual = generate(server, STAGING, size)
    url = f"{server.url.rsplit('/', 1)[0]}/{STAGING}"
    env = dict(os.environ, STAGING_DATABASE_URL=url, BACKUP_DIR=str(work / "backups"), LOG_DIR=str(work / "logs"),
               PG_BIN_DIR=bindir, ENV_FILE=str(work / "none.env"))
    plain_env = dict(os.environ, **info.libpq_env(STAGING), PGPASSWORD=info.password or "")
    for run in range(runs):
        print(f"  round {run + 1}/{runs}")
        subprocess.run(["rm", "-rf", str(work / "backups")])
        quiet(admin)
        made, _, out = rusage_run([sys.executable, str(ROOT / "create_rollback_point.py"), f"swap {run}", "--json"],
                                  env)
        point = json.loads(out)
        assert point.get("warm_database"), "the point has no warm copy"
        record(actual, "create_rollback_point.py (dump + warm copy)", made)
        staging = connect(info, STAGING)
        execute(staging, "CREATE TABLE bench_migrated (x int)")  # the migration the rollback undoes
        staging.close()
        quiet(admin)
        started = time.monotonic()
        watcher = Watcher(info, started)
        proc = subprocess.run([sys.executable, str(ROOT / "quick_rollback.py"), "--yes", "--json"], env=env,
                              capture_output=True, text=True)
        ended = time.monotonic() - started
        time.sleep(0.05)
        watcher.close()
        if proc.returncode != 0:
            raise SystemExit(f"quick_rollback failed: {proc.stderr[-1500:]}")
        summary = json.loads(proc.stdout)
        if watcher.served is None or watcher.swap_gap is None or not summary.get("warm_again"):
            raise SystemExit(f"staging never served the point, or it was not re-armed: {summary}")
        record(actual, "ours: quick_rollback.py, staging serves the point", watcher.served,
               {"unavailable_s": watcher.swap_gap, "summary_unavailable_s": summary["unavailable_seconds"],
                "closing_attempt_s": watcher.swap_closing_attempt, "longest_gap_s": watcher.longest_gap,
                "longest_gap_closing_attempt_s": watcher.closing_attempt})
        print(f"    unavailable at the swap: {watcher.swap_gap * 1000:.0f} ms seen by the watcher (from its last "
              f"answer with the migrated state to its first with the point), of which its first connection and "
              f"query to the point {watcher.swap_closing_attempt * 1000:.0f} ms; the tool's own measure "
              f"{summary['unavailable_seconds'] * 1000:.0f} ms; longest stretch without an answer over the "
              f"whole run, re-arm included: {watcher.longest_gap * 1000:.0f} ms (of which one connection and query "
              f"{watcher.closing_attempt * 1000:.0f} ms)")
        record(actual, "ours: quick_rollback.py, the point warm again (re-armed)", ended)
        drop_database(admin, summary["kept_as"])
        if not peers:
            continue
        rearmed = json.loads(subprocess.run([sys.executable, str(ROOT / "rollback_manager.py"), "list", "--json"],
                                            env=env, capture_output=True, text=True).stdout)["points"][0]
        quiet(admin)
        began = time.monotonic()
        execute(admin, f'CREATE DATABASE bench_raw TEMPLATE "{rearmed["warm_database"]}" STRATEGY FILE_COPY')
        record(actual, "CREATE DATABASE ... TEMPLATE warm copy STRATEGY FILE_COPY", time.monotonic() - began)
        drop_database(admin, "bench_raw")
        execute(admin, "CREATE DATABASE bench_plain")
        quiet(admin)
        seconds, _, _ = rusage_run([f"{bindir}/pg_restore", "-j", "2", "-d", "bench_plain", point["path"]],
                                   dict(plain_env, PGDATABASE="bench_plain"))
        record(actual, "pg_restore -j 2 (new database)", seconds)
        drop_database(admin, "bench_plain")
        if dslr:
            argv = [dslr, "--url", url]
            rusage_run(argv + ["snapshot", f"swap{run}", "--yes"], env)
            quiet(admin)
            seconds, _, _ = rusage_run(argv + ["restore", f"swap{run}"], env)
            record(actual, "DSLR restore", seconds)
            rusage_run(argv + ["delete", f"swap{run}"], env)
    subprocess.run([sys.executable, str(ROOT / "rollback_manager.py"), "cleanup", "--keep", "0", "--yes"], env=env,
                   capture_output=True)
    for leftover in [r[0] for r in _rows(admin, "SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_staging\\_\\_%'")]:
        drop_database(admin, leftover)
    admin.close()
    return actual


def _rows(conn, query):
    with conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


SERIES = ["ours: quick_rollback.py, staging serves the point", "ours: quick_rollback.py, the point warm again (re-armed)",
          "CREATE DATABASE ... TEMPLATE warm copy STRATEGY FILE_COPY", "pg_restore -j 2 (new database)", "DSLR restore",
          "create_rollback_point.py (dump + warm copy)"]


def table(results: dict, args, major: int) -> list:
    sizes = sorted(results)
    lines = [f"## The warm copy swapped in: time to serve the point against size ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, ext4, PostgreSQL {major} (fsync on), OS cache "
             f"dropped before each step; medians of {args.runs} runs. Command: `python3 benchmarks/swap.py --sizes "
             f"{args.sizes} --major {major} --runs {args.runs}`. Times from the start of the process, Python's start "
             "included; 'serves' is when a new connection first saw the point's data.", "",
             "| seconds | " + " | ".join(human_size(s) for s in sizes) + " |",
             "| --- | " + " | ".join("---" for _ in sizes) + " |"]
    for name in SERIES:
        if not all(name in results[s] for s in sizes):
            continue
        cells = []
        for s in sizes:
            values = [r["seconds"] for r in results[s][name]]
            cells.append(f"{statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    def ms(s, key):
        return statistics.median(r[key] for r in results[s][SERIES[0]]) * 1000

    gaps = [f"{human_size(s)}: {ms(s, 'unavailable_s'):.0f} ms (the tool's own measure {ms(s, 'summary_unavailable_s'):.0f} ms; "
            f"longest stretch without an answer over the whole run, re-arm included, {ms(s, 'longest_gap_s'):.0f} ms)"
            for s in sizes]
    lines += ["", "Staging unavailable at the swap, from a watcher's last answer with the migrated state to its first "
              "with the point (a new connection every 5 ms), median: " + "; ".join(gaps) + "."]
    return lines


def plot(results: dict, target: Path, python: str, work: Path) -> None:
    data = {name: [[s / 1e9 for s in sorted(results)],
                   [statistics.median(r["seconds"] for r in results[s][name]) for s in sorted(results)]]
            for name in SERIES[:5] if all(name in results[s] for s in results)}
    source = work / "plot.json"
    source.write_text(json.dumps(data))
    script = f"""
import json, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open({str(source)!r}))
fig, ax = plt.subplots(figsize=(8, 5))
for name, (x, y) in data.items():
    ax.plot(x, y, marker="o", label=name)
ax.set_xlabel("database size (GB)")
ax.set_ylabel("seconds")
ax.set_title("Rollback: time to serve the point, against a copy of the same database")
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig({str(target)!r}, dpi=100)
"""
    subprocess.run([python, "-c", script], check=True)
    print(f"plot: {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100MB,1GB,3GB")
    parser.add_argument("--major", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="append the table to this file (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "swap_plot.png"))
    parser.add_argument("--no-peers-install", action="store_true", help="no DSLR, no plot")
    parser.add_argument("--ours-only", action="store_true", help="only the rollbacks: no FILE_COPY, pg_restore or DSLR")
    parser.add_argument("--keep-logs", help="copy the toolkit's logs of every run into this folder")
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    server = ThrowawayServer(args.major, durable=True).start()
    work = Path(tempfile.mkdtemp(prefix="rollback-swap-"))
    results: dict = {}

    def record(size, name, seconds, extra=None):
        results.setdefault(size, {}).setdefault(name, []).append({"seconds": seconds, **(extra or {})})
        print(f"    {name}: {seconds:.2f} s" + (f" {extra}" if extra else ""))

    try:
        dslr, aux_python, why = ((None, None, "--no-peers-install or --ours-only")
                                 if args.no_peers_install or args.ours_only else aux_environment(work))
        if not dslr:
            print(f"  DSLR and the plot left out: {why}")
        for text in sorted((t for t in args.sizes.split(",") if t.strip()), key=parse_size):
            print(f"== {text}")
            measure(server, work, parse_size(text), args.runs, dslr, record, peers=not args.ours_only)
        major = server.major
    finally:
        server.stop()
    try:
        lines = table(results, args, major)
        print("\n".join(lines))
        if args.out:
            with open(args.out, "a") as fh:
                fh.write("\n" + "\n".join(lines) + "\n")
        if aux_python:
            plot(results, Path(args.plot), aux_python, work)
    finally:
        if args.keep_logs:
            subprocess.run(["cp", "-r", str(work / "logs"), args.keep_logs])
        subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
