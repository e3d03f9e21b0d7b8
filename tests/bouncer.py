"""A real PgBouncer (Debian's `pgbouncer`) in front of a test server: transaction pooling, scram
auth, run as an unprivileged user when the tests run as root."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

from common.testing.testserver import UNPRIVILEGED, ThrowawayServer, free_port

INSTALL = "apt-get install pgbouncer (as root; ./setup_and_run.sh test does it when root)"


def binary() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    assert found, f"the PgBouncer tests need Debian's pgbouncer, which is not installed: {INSTALL}"
    return found


class Bouncer:
    """`with Bouncer(server, {"staging": ("owner", "pw")}) as b:` b.admin_url, b.url(db, user, pw)."""

    ADMIN, ADMIN_PASSWORD = "rbadmin", "admin-pw-1"

    def __init__(self, server: ThrowawayServer, databases: Dict[str, tuple]):
        self.server, self.databases = server, databases
        self.port = free_port()
        self.base: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Bouncer":
        self.base = Path(tempfile.mkdtemp(prefix="rollback-pgbouncer-"))
        users = {self.ADMIN: self.ADMIN_PASSWORD, **{u: p for u, p in self.databases.values()}}
        (self.base / "userlist.txt").write_text("".join(f'"{u}" "{p}"\n' for u, p in users.items()))
        dbs = "".join(f"{name} = host=127.0.0.1 port={self.server.info.port} dbname={name}\n" for name in self.databases)
        (self.base / "pgbouncer.ini").write_text(f"""[databases]
{dbs}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.base}/userlist.txt
admin_users = {self.ADMIN}
pool_mode = transaction
max_client_conn = 200
default_pool_size = 10
logfile = {self.base}/pgbouncer.log
ignore_startup_parameters = extra_float_digits,options
server_login_retry = 1
""")
        as_user = {}
        if os.geteuid() == 0:
            user, group = UNPRIVILEGED
            for path in [self.base, *self.base.iterdir()]:
                shutil.chown(path, user, group)
            as_user = {"user": user, "group": group, "extra_groups": []}
        self.proc = subprocess.Popen([binary(), str(self.base / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **as_user)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.log()
                assert time.monotonic() < deadline, "PgBouncer did not start: " + self.log()
                time.sleep(0.05)

    def log(self) -> str:
        path = self.base / "pgbouncer.log" if self.base else None
        return path.read_text()[-3000:] if path and path.exists() else "(no log)"

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self.ADMIN}:{self.ADMIN_PASSWORD}@127.0.0.1:{self.port}/pgbouncer"

    def url(self, dbname: str) -> str:
        user, password = self.databases[dbname]
        from urllib.parse import quote
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{dbname}"

    def paused(self, dbname: str) -> bool:
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, dbname="pgbouncer", user=self.ADMIN,
                                password=self.ADMIN_PASSWORD)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW DATABASES")
                columns = [d[0] for d in cur.description]
                for row in cur.fetchall():
                    if row[0] == dbname:
                        return bool(row[columns.index("paused")])
        finally:
            conn.close()
        raise AssertionError(f"PgBouncer has no database {dbname}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
