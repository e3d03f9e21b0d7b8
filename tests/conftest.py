"""Session fixtures: real PostgreSQL servers (DESIGN §11), never mocks; a missing server fails."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.testserver import ThrowawayServer  # noqa: E402
from tests import pgfixtures as pf  # noqa: E402

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
_servers = {}


def _server(major):
    if major not in _servers:
        _servers[major] = ThrowawayServer(major).start()
    return _servers[major]


def pytest_sessionfinish(session, exitstatus):
    for server in _servers.values():
        server.stop()


@pytest.fixture(scope="session")
def pg15():
    return _server(15)


@pytest.fixture(scope="session")
def pg18():
    return _server(18)


@pytest.fixture(scope="session", params=[15, 18], ids=["pg15", "pg18"])
def server(request):
    """Runs the test once against PostgreSQL 15 and once against 18."""
    return _server(request.param)


@pytest.fixture
def rich_db(server):
    name = pf.create_database(server, pf.unique_name("rich"), pf.RICH_SCHEMA)
    yield name
    pf.drop_database(server, name)


@pytest.fixture
def rich15(pg15):
    name = pf.create_database(pg15, pf.unique_name("rich"), pf.RICH_SCHEMA)
    yield name
    pf.drop_database(pg15, name)


@pytest.fixture
def env_for(tmp_path):
    """env_for(server, dbname, **more) -> environment of a script run against that database."""
    def make(server, dbname, **more):
        more.setdefault("PG_BIN_DIR", server.bindir)  # as a user with the server's client tools would
        more.setdefault("STAGING_DATABASE_URL", pf.url(server, dbname))
        return pf.script_env(tmp_path, **more)
    return make


@pytest.fixture
def embedded_bindir(pg18):
    assert pg18.bindir and os.path.exists(os.path.join(pg18.bindir, "pg_dump"))
    return pg18.bindir
