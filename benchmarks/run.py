#!/usr/bin/env python3
"""Time the toolkit against the plain tools on a generated database (DESIGN §13).

    python3 benchmarks/run.py --size 1GB [--major 15] [--runs 3]

Starts its own throwaway PostgreSQL (fsync on), fills a database with random text and numbers
(with indexes; not pgbench's compressible rows), then times, alternating ours and the peer in
each round: rollback point creation against `pg_dump -Fc` and `pg_dump -Fc -Z0`, and the quick
rollback against `pg_restore -j 2` into a new database. Medians go to benchmarks/RESULTS.md."""
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.database import connect, database_size, drop_database, execute  # noqa: E402
from common.progress import human_size  # noqa: E402
from common.testserver import ThrowawayServer  # noqa: E402


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def generate(server: ThrowawayServer, dbname: str, size: int) -> int:
    """Random hex text and numbers in four indexed tables, until the database reaches `size`."""
    admin = connect(server.info)
    execute(admin, f'CREATE DATABASE "{dbname}"')
    conn = connect(server.info, dbname)
    for n in range(4):
        execute(conn, f"""CREATE TABLE data_{n} (id bigserial PRIMARY KEY, label text, body text,
                          amount double precision, qty int, created timestamptz)""")
    batch = 0
    while database_size(admin, dbname) < size:
        table = f"data_{batch % 4}"
        execute(conn, f"""INSERT INTO {table} (label, body, amount, qty, created)
            SELECT md5(random()::text), md5(random()::text) || md5(random()::text) || md5(random()::text),
                   random() * 1e6, (random() * 1e5)::int, now() - random() * interval '900 days'
            FROM generate_series(1, 200000)""")
        batch += 1
        print(f"\r  generating: {human_size(database_size(admin, dbname))}", end="", flush=True)
    for n in range(4):
        execute(conn, f"CREATE INDEX ON data_{n} (qty)")
    execute(conn, "VACUUM ANALYZE")
    conn.close()
    final = database_size(admin, dbname)
    admin.close()
    print(f"\r  generated {human_size(final)} in {dbname}")
    return final


DROP_CACHE = True


def cold_cache() -> None:
    """sync, then drop the OS page cache when we may (root) and were not told to keep it."""
    os.sync()
    if not DROP_CACHE:
        return
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        pass


def rusage_run(argv, env) -> tuple:
    """(seconds, peak RSS in MB of that process alone, stdout)"""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 reports this child's own peak memory (RUSAGE_CHILDREN would mix all children)
    out_chunks = []
    while True:
        chunk = proc.stdout.read(65536)
        if not chunk:
            break
        out_chunks.append(chunk)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, argv))}\n{err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, b"".join(out_chunks).decode()


def make_repo(path: Path, files_count: int = 10_000, commits: int = 1_000) -> None:
    """A repository of `files_count` files and `commits` commits, built with git fast-import."""
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    lines = []
    for n in range(commits):
        lines.append("commit refs/heads/main")
        lines.append(f"committer Bench <bench@example.com> {1700000000 + n} +0000")
        message = f"commit {n}"
        lines.append(f"data {len(message)}\n{message}")
        changed = range(files_count) if n == 0 else [(n * 7 + k) % files_count for k in range(5)]
        for f in changed:
            body = f"file {f} revision {n}\n" + "x" * (f % 200) + "\n"
            lines.append(f"M 644 inline src/{f // 100:03d}/file_{f:05d}.txt")
            lines.append(f"data {len(body.encode())}\n{body}")
    stream = ("\n".join(lines) + "\n").encode()
    subprocess.run(["git", "fast-import", "--quiet"], cwd=path, input=stream, check=True)
    subprocess.run(["git", "checkout", "-q", "-f", "main"], cwd=path, check=True)


def bench_files(work: Path, args, record) -> None:
    """Code rollback on a 10,000-file, 1,000-commit repository; configuration rollback on 1,000 files."""
    repo = work / "repo"
    print(f"  building a {args.repo_files}-file, {args.repo_commits}-commit repository ...")
    make_repo(repo, args.repo_files, args.repo_commits)
    config = work / "config"
    for n in range(args.config_files):
        target = config / f"service_{n // 50:02d}" / (f"conf_{n:04d}.yml" if n % 2 else f"conf_{n:04d}.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"service": n, "pool": n % 17, "url": f"https://svc{n}.example"}) + "\n")
    env = dict(os.environ, REPO_PATH=str(repo), CODE_BACKUP_DIR=str(work / "code_backups"), CONFIG_DIR=str(config),
               CONFIG_BACKUP_DIR=str(work / "config_backups"), ENV_FILE=str(work / "app.env"), LOG_DIR=str(work / "logs"),
               GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@x")
    script = lambda name: [sys.executable, str(ROOT / name)]  # noqa: E731

    def timed_run(argv):
        cold_cache()
        return rusage_run(argv, env)

    for _ in range(args.runs):
        seconds, peak, _ = timed_run(script("code_rollback.py") + ["backup"])
        record("ours: code_rollback.py backup", seconds, peak)
        seconds, peak, _ = timed_run(script("code_rollback.py") + ["rollback", "HEAD~1", "--yes"])
        record("ours: code_rollback.py rollback (with its automatic backup)", seconds, peak)
        newest = sorted((work / "code_backups").glob("code_*"))[0]
        seconds, peak, _ = timed_run(script("code_rollback.py") + ["restore", str(newest), "--yes"])
        record("ours: code_rollback.py restore (with its automatic backup)", seconds, peak)
        subprocess.run(["rm", "-rf", str(work / "code_backups")])
        seconds, peak, _ = timed_run(script("config_rollback.py") + ["backup"])
        record("ours: config_rollback.py backup", seconds, peak)
        for path in list(config.rglob("*.json"))[:100]:
            path.write_text("{}\n")
        [backup] = list((work / "config_backups").glob("config_*"))
        seconds, peak, _ = timed_run(script("config_rollback.py") + ["restore", str(backup), "--yes"])
        record("ours: config_rollback.py restore (with its automatic backup)", seconds, peak)
        subprocess.run(["rm", "-rf", str(work / "config_backups")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--major", type=int, default=15)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--skip-files", action="store_true", help="leave out the code and configuration timings")
    parser.add_argument("--keep-cache", action="store_true", help="do not drop the OS page cache between steps")
    parser.add_argument("--repo-files", type=int, default=10_000)
    parser.add_argument("--repo-commits", type=int, default=1_000)
    parser.add_argument("--config-files", type=int, default=1_000)
    args = parser.parse_args()
    size = parse_size(args.size)
    global DROP_CACHE
    DROP_CACHE = not args.keep_cache
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out

    server = ThrowawayServer(args.major, durable=True).start()
    work = Path(tempfile.mkdtemp(prefix="rollback-bench-"))
    try:
        info = server.info
        bindir = server.bindir
        staging = "bench_staging"
        print(f"PostgreSQL {server.major} at {info.masked()}, work folder {work}")
        actual = generate(server, staging, size)
        env = dict(os.environ, STAGING_DATABASE_URL=f"{server.url.rsplit('/', 1)[0]}/{staging}",
                   BACKUP_DIR=str(work / "backups"), LOG_DIR=str(work / "logs"), PG_BIN_DIR=bindir,
                   ENV_FILE=str(work / "none.env"))
        plain_env = dict(os.environ, **info.libpq_env(staging), PGPASSWORD=info.password or "")
        results: dict = {}
        admin = connect(info)

        def quiet() -> None:
            """Every timed step starts alike: dirty buffers flushed (a FILE_COPY copy starts with a
            checkpoint: it must not pay for the step before) and, where allowed, the OS cache dropped,
            so that each reads its data from disk, as a rollback at 3 a.m. would."""
            execute(admin, "CHECKPOINT")
            cold_cache()

        def raw_copies(source: str, what: str) -> None:
            """The peers of a snapshot: a bare TEMPLATE copy of the same source, both strategies."""
            for strategy, label in (("", "raw CREATE DATABASE ... TEMPLATE"),
                                    (" STRATEGY FILE_COPY", "raw CREATE DATABASE ... TEMPLATE STRATEGY FILE_COPY")):
                quiet()
                started = time.monotonic()
                execute(admin, f'CREATE DATABASE "bench_raw" TEMPLATE "{source}"{strategy}')
                record(f"{label} ({what})", time.monotonic() - started)
                drop_database(admin, "bench_raw")

        def record(name, seconds, peak=None, extra=None):
            results.setdefault(name, []).append({"seconds": seconds, "peak_mb": peak, **(extra or {})})
            print(f"  {name}: {seconds:.2f} s" + (f", peak {peak:.0f} MB" if peak else "")
                  + (f", {extra}" if extra else ""))

        for run in range(args.runs):
            print(f"round {run + 1}/{args.runs}")
            for z, name in ((None, "pg_dump -Fc"), ("0", "pg_dump -Fc -Z0")):
                target = work / "plain.dump"
                argv = [f"{bindir}/pg_dump", "-Fc", "-f", str(target)] + ([f"-Z{z}"] if z else [])
                quiet()
                seconds, _, _ = rusage_run(argv, plain_env)
                record(name, seconds, extra={"bytes": target.stat().st_size})
                target.unlink()
            quiet()
            seconds, peak, out = rusage_run([sys.executable, str(ROOT / "create_rollback_point.py"),
                                             f"bench {run}", "--json"], env)
            point = json.loads(out)
            record("ours: create_rollback_point.py", seconds, peak, {"bytes": point["size_bytes"]})

            plain_db = f"bench_plain_{run}"
            execute(admin, f'CREATE DATABASE "{plain_db}"')
            argv = [f"{bindir}/pg_restore", "-j", "2", "-d", plain_db, point["path"]]
            quiet()
            seconds, _, _ = rusage_run(argv, dict(plain_env, PGDATABASE=plain_db))
            record("pg_restore -j 2 (new database)", seconds)
            drop_database(admin, plain_db)

            quiet()
            seconds, peak, out = rusage_run([sys.executable, str(ROOT / "quick_rollback.py"), "--yes", "--json"], env)
            summary = json.loads(out)
            record("ours: quick_rollback.py", seconds, peak, {"unavailable_s": summary["unavailable_seconds"]})
            drop_database(admin, summary["kept_as"])
            for leftover in (work / "backups").glob("*"):
                leftover.unlink()

            # the emergency reset: staging (another database here) := a fresh copy of V2 (the generated one)
            reset_env = dict(env, V2_DATABASE_URL=env["STAGING_DATABASE_URL"],
                             STAGING_DATABASE_URL=f"{server.url.rsplit('/', 1)[0]}/bench_reset_target")
            quiet()
            seconds, peak, out = rusage_run([sys.executable, str(ROOT / "reset_staging.py"), "--yes", "--json"],
                                            reset_env)
            summary = json.loads(out)
            record("ours: reset_staging.py", seconds, peak, {"unavailable_s": summary["unavailable_seconds"]})
            if summary["kept_as"]:
                drop_database(admin, summary["kept_as"])

            # snapshots: creation against a raw copy of staging; restore against a raw copy of the
            # same snapshot (its files are as cold for the peer as for us)
            raw_copies(staging, "create")
            quiet()
            seconds, peak, out = rusage_run([sys.executable, str(ROOT / "simple_rollback.py"), "create",
                                             f"bench {run}", "--json"], env)
            snap = json.loads(out)
            record("ours: simple_rollback.py create", seconds, peak)
            raw_copies(snap["snapshot_database"], "restore")
            quiet()
            seconds, peak, out = rusage_run([sys.executable, str(ROOT / "simple_rollback.py"), "restore",
                                             "--yes", "--json"], env)
            summary = json.loads(out)
            record("ours: simple_rollback.py restore", seconds, peak, {"unavailable_s": summary["unavailable_seconds"]})
            drop_database(admin, summary["kept_as"])
            drop_database(admin, snap["snapshot_database"])
            for leftover in (work / "backups").glob("*"):
                leftover.unlink()
        drop_database(admin, "bench_reset_target")
        admin.close()
        if not args.skip_files:
            bench_files(work, args, record)
        write_results(Path(args.out), results, server, actual, args)
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(work)])
    return 0


NOTES = """
## How to read this, and what limits each figure

- Every timed step starts with `CHECKPOINT`, `sync` and a dropped OS page cache (as root), so
  each reads its data from disk as a rollback at 3 a.m. would, and none pays for the writes of
  the step before. "Ours" is the whole command as a user runs it (Python start, confirmation
  logic, locks, checks, logs); a peer is the bare statement or tool.
- **create (dump)**: pg_dump with gzip (the default `-Fc`) is CPU-bound; ours writes an
  uncompressed custom-format dump (pg_dump 15 has no lz4), counts the rows of every table in the
  same snapshot beside it, and hashes the file: the margin over `-Z0` is the count and the sha256.
  The price is disk: 902 MB instead of 486 MB (`--compress 6` gives the small file back).
- **restore (dump)**: pg_restore -j 2 does the work in both. Ours adds the sha256 of the dump (in a
  thread, beside pg_restore), exact row counts of every table and an ANALYZE (the plain restore
  leaves the database without planner statistics), and the swap. On this 2-core machine the
  hashing competes with pg_restore for a core, and the figures of both sides vary by +/-2 s from
  run to run with the disk's checkpoint load.
- **snapshots**: ours copies with `STRATEGY FILE_COPY` (a checkpoint, then a file copy), which is
  why it beats the default `CREATE DATABASE ... TEMPLATE` (WAL_LOG since PostgreSQL 15, every page
  written to WAL). Against a raw FILE_COPY of the same source, ours is about 0.8 s slower: the
  Python start from a cold cache, the connections, the table check and the swap.
- **staging unavailable** is the time between `ALLOW_CONNECTIONS false` and the committed rename
  swap; the restore itself runs while staging serves.
- **code / configuration**: each script run from a cold cache, medians as above; code backup +
  rollback is the issue's 3-second budget; configuration backup + restore includes a second, automatic backup
  inside the restore.
"""


def write_results(path: Path, results: dict, server, actual: int, args) -> None:
    def median(name, key="seconds"):
        values = [r[key] for r in results[name] if r.get(key) is not None]
        return statistics.median(values) if values else None

    rows = [
        ("create (dump)", "ours: create_rollback_point.py", "pg_dump -Fc"),
        ("create (dump)", "ours: create_rollback_point.py", "pg_dump -Fc -Z0"),
        ("restore (dump)", "ours: quick_rollback.py", "pg_restore -j 2 (new database)"),
        ("create (snapshot)", "ours: simple_rollback.py create", "raw CREATE DATABASE ... TEMPLATE (create)"),
        ("create (snapshot)", "ours: simple_rollback.py create",
         "raw CREATE DATABASE ... TEMPLATE STRATEGY FILE_COPY (create)"),
        ("restore (snapshot)", "ours: simple_rollback.py restore", "raw CREATE DATABASE ... TEMPLATE (restore)"),
        ("restore (snapshot)", "ours: simple_rollback.py restore",
         "raw CREATE DATABASE ... TEMPLATE STRATEGY FILE_COPY (restore)"),
    ]
    lines = [f"# Benchmark results ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"PostgreSQL {server.major} (fsync on), database {human_size(actual)} of random text and numbers "
             f"with indexes; medians of {args.runs} runs. Command: `python3 benchmarks/run.py --size {args.size} "
             f"--major {args.major} --runs {args.runs}`.", "",
             "| operation | ours (s) | peer | peer (s) | ours / peer |", "| --- | --- | --- | --- | --- |"]
    for op, ours, peer in rows:
        a, b = median(ours), median(peer)
        lines.append(f"| {op} | {a:.2f} | {peer} | {b:.2f} | {a / b:.2f} |")
    lines += ["", "| measurement | median |", "| --- | --- |"]
    for name in results:
        lines.append(f"| {name}: seconds | {median(name):.2f} |")
        if median(name, "bytes"):
            lines.append(f"| {name}: file size | {human_size(median(name, 'bytes'))} |")
        if median(name, "peak_mb"):
            lines.append(f"| {name}: peak memory of our process | {median(name, 'peak_mb'):.0f} MB |")
        if median(name, "unavailable_s") is not None:
            lines.append(f"| {name}: staging unavailable | {median(name, 'unavailable_s') * 1000:.0f} ms |")
    path.write_text("\n".join(lines) + "\n" + NOTES)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
