#!/usr/bin/env python3
"""reset_staging.py against `pgcopydb clone` on the same database, alternating (issue 32).

    python3 benchmarks/reset.py --size 1GB [--major 15] [--runs 3] [--out FILE]

Same throwaway server and generated data as benchmarks/run.py (fsync on, the OS page cache dropped
before each step when root). The generated database plays V2; reset_staging replaces another
database from it (a fresh copy, checked by exact row counts, then swapped in), pgcopydb clones it
into a new database. Medians and each run are printed, and appended to --out."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import cold_cache, debian_tool, generate, parse_size, pgcopydb_clone, rusage_run  # noqa: E402

from common.pg.database import connect, drop_database, execute  # noqa: E402
from common.progress import human_size  # noqa: E402
from common.testing.testserver import ThrowawayServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--major", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    pgcopydb = debian_tool("pgcopydb", "pgcopydb", argparse.Namespace(no_peers_install=False))
    server = ThrowawayServer(args.major, durable=True).start()
    work = Path(tempfile.mkdtemp(prefix="rollback-reset-"))
    results: dict = {}

    def record(name, seconds, *_):
        results.setdefault(name, []).append(seconds)
        print(f"    {name}: {seconds:.2f} s")

    try:
        admin = connect(server.info)
        actual = generate(server, "bench_v2", parse_size(args.size))
        base = server.url.rsplit("/", 1)[0]
        env = dict(os.environ, V2_DATABASE_URL=f"{base}/bench_v2", STAGING_DATABASE_URL=f"{base}/bench_target",
                   BACKUP_DIR=str(work / "backups"), LOG_DIR=str(work / "logs"), PG_BIN_DIR=server.bindir,
                   ENV_FILE=str(work / "none.env"))

        def quiet() -> None:
            execute(admin, "CHECKPOINT")
            cold_cache()

        for run in range(args.runs):
            print(f"  round {run + 1}/{args.runs}")
            quiet()
            seconds, _, out = rusage_run([sys.executable, str(ROOT / "reset_staging.py"), "--yes", "--json"], env)
            summary = json.loads(out)
            record("ours: reset_staging.py", seconds)
            if summary.get("kept_as"):
                drop_database(admin, summary["kept_as"])
            if pgcopydb:
                pgcopydb_clone(pgcopydb, server.info, server.bindir, "bench_v2", work, record, quiet)
        admin.close()
        major = server.major
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(work)])
    ours = statistics.median(results["ours: reset_staging.py"])
    lines = [f"## reset_staging against pgcopydb clone ({time.strftime('%Y-%m-%d')})", "",
             f"{human_size(actual)}, PostgreSQL {major}, fsync on, cold cache before each step, {args.runs} runs "
             f"alternating. Command: `python3 benchmarks/reset.py --size {args.size} --runs {args.runs}`.", "",
             "| step | median (s) | runs (s) |", "| --- | --- | --- |"]
    for name, values in results.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    if "pgcopydb clone (new database)" in results:
        peer = statistics.median(results["pgcopydb clone (new database)"])
        ratios = [a / b for a, b in zip(results["ours: reset_staging.py"], results["pgcopydb clone (new database)"])]
        lines += ["", f"reset_staging / pgcopydb clone: {ours / peer:.2f}x (medians; run by run "
                      f"{', '.join(f'{r:.2f}' for r in ratios)})."]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
