"""A smoke run of the benchmark at a tiny size: it must run end to end and write its table."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size", "5MB", "--runs", "1",
                             "--repo-files", "200", "--repo-commits", "20", "--config-files", "50", "--keep-cache",
                             "--no-peers-install", "--no-cow", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = out.read_text()
    for row in ("| create (dump) |", "| restore (dump) |", "| restore (warm copy) |", "| create (dump + warm copy) |",
                "| restore (snapshot) |", "code_rollback.py backup",
                "config_rollback.py restore", "staging unavailable"):
        assert row in text
    # With PgBouncer present (CI installs it; every server's bindir has pgbench), the clients table
    # is there, and clients through PgBouncer saw no error during the rollback.
    if shutil.which("pgbouncer") or os.path.exists("/usr/sbin/pgbouncer"):
        row = next((line for line in text.splitlines() if line.startswith("| through PgBouncer")), None)
        assert row, text
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4:6] == ["0", "0"], row  # aborted clients, failed transactions
