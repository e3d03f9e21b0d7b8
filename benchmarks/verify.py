#!/usr/bin/env python3
"""What the content proof costs (issue 28): verify against `pg_dump -Fc -Z0`, and a rollback point
with its fingerprint against one without (another checkout of the toolkit, given with --baseline).

    python3 benchmarks/verify.py --size 1GB [--major 15] [--runs 3] [--baseline /path/to/older/toolkit]

Same throwaway server and generated data as benchmarks/run.py (fsync on, cold cache before each
step when root). Prints the medians and appends them to benchmarks/RESULTS.md with --out."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import cold_cache, generate, parse_size  # noqa: E402

from common.testing.testserver import ThrowawayServer, server_bindirs  # noqa: E402


def timed(argv, env, expect: int = 0) -> float:
    cold_cache()
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != expect:
        raise SystemExit(f"{argv[1] if len(argv) > 1 else argv[0]} failed ({done.returncode}): "
                         f"{(done.stderr or done.stdout)[-800:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--major", type=int)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout of the toolkit: its point creation is the 'before'")
    parser.add_argument("--out", help="append the table to this file (e.g. benchmarks/RESULTS.md)")
    args = parser.parse_args()
    majors = sorted(server_bindirs())
    major = args.major or (15 if 15 in majors else majors[0])
    server = ThrowawayServer(major).start()
    work = Path(tempfile.mkdtemp(prefix="rollback-verify-bench-"))
    os.chmod(work, 0o700)
    try:
        size = generate(server, "bench", parse_size(args.size))
        info = server.info
        url = f"postgresql://{quote(info.user or '')}:{quote(info.password or '', safe='')}@{info.host}:{info.port}/bench"
        env = dict(os.environ, STAGING_DATABASE_URL=url, BACKUP_DIR=str(work / "backups"), LOG_DIR=str(work / "logs"),
                   ENV_FILE=str(work / "absent.env"), PG_BIN_DIR=server.bindir or "", PGPASSWORD=info.password or "",
                   PGHOST=info.host, PGPORT=str(info.port), PGUSER=info.user or "")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        pg_dump = os.path.join(server.bindir, "pg_dump") if server.bindir else "pg_dump"
        rows = {"pg_dump -Fc -Z0": [], "verify --strict (fingerprint)": [],
                "verify --strict, one row changed (found and located)": [], "verify --quick (counts)": [],
                "create_rollback_point --no-warm (with fingerprint)": []}
        if args.baseline:
            rows["create_rollback_point --no-warm (baseline, no fingerprint)"] = []
        py = sys.executable
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)
            rows["pg_dump -Fc -Z0"].append(timed([pg_dump, "-Fc", "-Z0", "-f", str(work / "peer.dump"), "bench"], env))
            (work / "peer.dump").unlink()
            rows["create_rollback_point --no-warm (with fingerprint)"].append(
                timed([py, str(ROOT / "create_rollback_point.py"), f"bench {run}", "--no-warm"], env))
            if args.baseline:
                rows["create_rollback_point --no-warm (baseline, no fingerprint)"].append(timed(
                    [py, str(Path(args.baseline) / "create_rollback_point.py"), f"base {run}", "--no-warm"],
                    dict(env, BACKUP_DIR=str(work / "baseline-backups"))))
            rows["verify --strict (fingerprint)"].append(
                timed([py, str(ROOT / "database_rollback.py"), "verify", "--strict"], env))
            changed = f"UPDATE data_1 SET body = 'changed {run}' WHERE id = (SELECT max(id) / 2 FROM data_1)"
            subprocess.run([os.path.join(server.bindir, "psql") if server.bindir else "psql", "-qX", "-d", "bench",
                            "-c", changed], env=env, check=True, capture_output=True)
            rows["verify --strict, one row changed (found and located)"].append(
                timed([py, str(ROOT / "database_rollback.py"), "verify", "--strict"], env, expect=4))
            rows["verify --quick (counts)"].append(
                timed([py, str(ROOT / "database_rollback.py"), "verify", "--quick"], env))
        medians = {k: statistics.median(v) for k, v in rows.items()}
        dump = medians["pg_dump -Fc -Z0"]
        lines = [f"### Content proof on {size / 1e9:.2f} GB, PostgreSQL {major}, {args.runs} runs, medians "
                 f"({time.strftime('%Y-%m-%d')})", "", "| step | seconds | vs pg_dump -Fc -Z0 | runs |",
                 "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {m:.2f} | {m / dump:.2f}x | {', '.join(f'{x:.2f}' for x in rows[k])} |" for k, m in medians.items()]
        if args.baseline:
            base = medians["create_rollback_point --no-warm (baseline, no fingerprint)"]
            extra = medians["create_rollback_point --no-warm (with fingerprint)"] / base - 1
            lines += ["", f"Extra cost of the fingerprint when making a point: {extra * 100:+.0f} % (goal: at most +15 %)."]
        ratio = medians["verify --strict (fingerprint)"] / dump
        found = medians["verify --strict, one row changed (found and located)"] / dump
        lines.append(f"Verify against pg_dump -Fc -Z0: {ratio:.2f}x with nothing changed, {found:.2f}x finding and "
                     "locating one changed row (goal: at most 0.5x).")
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write("\n" + text)
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
