"""First contact with a real server (DESIGN §2, §3): passwords typed unencoded never leak, unset
settings never aim at the toolkit itself, errors name what the user configured, --help shows only
what a script uses, and nothing is a trap (a typo'd staging, a missing V2, migrate without asking)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.testing.testserver import free_port
from tests import pgfixtures as pf
from tests.realistic import RealisticDatabase

WARM_COPIES = "0"  # warm copies are tested in test_warm.py (tests/conftest.py env_for)


@pytest.mark.parametrize("password", ["p@ss:w#rd/1", "a?b%c@dQ7z", "x:y/z#w?v@u9Kq"])
def test_a_password_with_url_characters_typed_unencoded_works_and_never_shows(pg_old, env_for, tmp_path, password):
    with RealisticDatabase(pg_old, password=password) as rd:
        raw = f"postgresql://{rd.owner}:{password}@127.0.0.1:{pg_old.info.port}/{rd.name}"
        env = env_for(pg_old, rd.name, STAGING_DATABASE_URL=raw)
        outputs = []
        for command in (("create_rollback_point.py", "pw"), ("rollback_manager.py", "list", "--json"),
                        ("quick_rollback.py", "--yes")):
            result = pf.run_script(*command, env=env)
            assert result.returncode == 0, result.stdout + result.stderr
            outputs.append(result.stdout + result.stderr)
        check = subprocess.run([str(pf.ROOT / "setup_and_run.sh"), "2"], env=env, capture_output=True, text=True,
                               timeout=120, stdin=subprocess.DEVNULL)
        outputs.append(check.stdout + check.stderr)
        written = [p.read_text(errors="replace") for folder in (env["LOG_DIR"], env["BACKUP_DIR"])
                   for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".log", ".json")]
        for text in outputs + written:
            # the whole password, and what the old parser leaked: everything after its first '@'
            for piece in {password, password.split("@", 1)[1]}:
                assert piece not in text, (piece, text[:2000])
        assert f"{rd.owner}:***@127.0.0.1" in outputs[2]


def test_errors_name_the_database_the_user_configured(pg_old, env_for, tmp_path):
    port = free_port()  # nothing listens there
    env = env_for(pg_old, "staging", STAGING_DATABASE_URL=f"postgresql://app:secret@127.0.0.1:{port}/staging")
    for command in (("create_rollback_point.py", "x"), ("quick_rollback.py", "--yes"), ("simple_rollback.py", "list")):
        result = pf.run_script(*command, env=env)
        line = result.stderr.strip().splitlines()[0]
        assert result.returncode == 1 and f"127.0.0.1:{port}/staging" in line, line
        assert "/postgres" not in line and "?." not in line and "secret" not in result.stderr
    check = subprocess.run([str(pf.ROOT / "setup_and_run.sh"), "2"], env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
    assert "cannot connect: cannot connect" not in check.stdout + check.stderr


def test_unset_settings_are_named_and_never_aim_at_the_toolkit(pg_old, rich_old, env_for, tmp_path):
    env = env_for(pg_old, rich_old)
    for command, variable in ((("code_rollback.py", "backup"), "REPO_PATH"),
                              (("config_rollback.py", "backup"), "CONFIG_DIR"),
                              (("database_rollback.py", "migrate", "--yes"), "MIGRATIONS_DIR")):
        result = pf.run_script(*command, env=env)
        assert result.returncode == 2 and f"{variable} is not set" in result.stderr, result.stdout + result.stderr
    assert not Path(env["CODE_BACKUP_DIR"] if "CODE_BACKUP_DIR" in env else tmp_path / "none").exists()
    # The check names them, as warnings: points, restores and resets work without them (README: optional).
    settings = tmp_path / "app.env"
    settings.write_text(f"V2_DATABASE_URL={pf.url(pg_old, 'postgres')}\n")  # a password, readable by others
    settings.chmod(0o644)
    env["ENV_FILE"] = str(settings)
    check = subprocess.run([str(pf.ROOT / "setup_and_run.sh"), "2"], env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
    out = check.stdout + check.stderr
    assert check.returncode == 0 and "Problems: none" in out, out
    assert all(f"WARNING: {v} is not set" in check.stderr for v in ("REPO_PATH", "CONFIG_DIR", "MIGRATIONS_DIR"))
    assert f"WARNING: {settings} holds a password and other users may read it (mode 644): chmod 600" in check.stderr
    assert "owner and mode OK" not in out or all(
        Path(line.split(": ", 1)[0].split(None, 1)[1]).is_dir() for line in out.splitlines() if "owner and mode OK" in line)
    settings.chmod(0o600)
    again = subprocess.run([str(pf.ROOT / "setup_and_run.sh"), "2"], env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
    assert again.returncode == 0 and "holds a password" not in again.stdout + again.stderr


def test_a_staging_that_does_not_exist_is_refused_not_created(pg_old, rich_old, env_for):
    env = env_for(pg_old, rich_old, STAGING_DATABASE_URL=pf.url(pg_old, rich_old + "_typo"))
    result = pf.run_script("quick_rollback.py", "--yes", env=env)
    assert result.returncode == 2 and "does not exist" in result.stderr and "reset_staging.py" in result.stderr
    assert not pf.database_exists(pg_old, rich_old + "_typo")


def test_a_missing_v2_is_named_before_the_question(pg_old, rich_old, env_for):
    env = env_for(pg_old, rich_old, V2_DATABASE_URL=pf.url(pg_old, "no_such_v2"))
    result = pf.run_script("reset_staging.py", env=env)  # no --yes: the error must come before any question
    assert result.returncode == 1 and "no_such_v2" in result.stderr and "Reset" not in result.stdout


@pytest.mark.parametrize("script, flag", [("quick_rollback.py", "--db-name"), ("create_rollback_point.py", "--db-host"),
                                          ("database_rollback.py verify", "--wait")])
def test_an_option_a_script_does_not_use_is_an_error(pg_old, rich_old, env_for, script, flag):
    env = env_for(pg_old, rich_old)
    result = pf.run_script(*script.split(), flag, "x", "--yes" if "quick" in script else "--json", env=env)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr, result.stdout + result.stderr
    helped = pf.run_script(*script.split(), "--help", env=env)
    assert flag not in helped.stdout


def test_interrupted_at_the_question_says_nothing_changed(pg_old, rich_old, env_for):
    import os
    import pty
    import signal
    import time
    env = env_for(pg_old, rich_old)
    assert pf.run_script("create_rollback_point.py", "before", env=env).returncode == 0
    before = pf.fingerprint(pg_old, rich_old)
    pid, fd = pty.fork()
    if pid == 0:  # the child: only ever the script, never the rest of this test run
        try:
            # A run started in the background inherits SIGINT ignored, and Python then keeps it so: a
            # user at a terminal has it at its default, which Python turns into KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, str(pf.ROOT / "quick_rollback.py")], env)
        finally:
            os._exit(127)
    import select

    def read_for(seconds: float, until: bytes = b"") -> bytes:
        got, stop = b"", time.monotonic() + seconds
        while time.monotonic() < stop and (not until or until not in got):
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                got += chunk
        return got

    output = read_for(60, b"Type 'yes'")
    assert b"Type 'yes'" in output, output.decode(errors="replace")
    os.kill(pid, signal.SIGINT)
    output += read_for(30)
    text = output.decode(errors="replace")
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("quick_rollback did not end after Ctrl-C:\n" + text)
        time.sleep(0.1)
    assert os.WEXITSTATUS(status) == 3 and "Nothing was changed" in text, text
    assert "\nerror: declined" in text.replace("\r", "")
    assert pf.fingerprint(pg_old, rich_old) == before
    assert json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]


def test_a_busy_machine_is_not_a_sick_database(pg_old, rich_old, env_for):
    """Load on the toolkit's machine that is not the server's processes makes the verdict unknown;
    the server's own processes over the limit make it not OK."""
    env = env_for(pg_old, rich_old, ROLLBACK_MAX_CPU_PERCENT="40")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        result = pf.run_script("database_rollback.py", "verify", "--quick", "--json", env=env)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["machine_cpu_percent"] > 40 and metrics["cpu_percent"] < 40, metrics
    assert metrics["verdict"] == "unknown" and not metrics["problems"], metrics
    assert "not the server processes'" in metrics["unknown"][0] and "on this machine" in metrics["host"], metrics
    strict = pf.run_script("database_rollback.py", "verify", "--quick", "--json",
                           env=dict(env, ROLLBACK_MAX_CPU_PERCENT="-1"))
    metrics = json.loads(strict.stdout)["metrics"]
    assert metrics["verdict"] == "not OK" and metrics["problems"][0].startswith("the server processes' CPU"), metrics
    text = pf.run_script("database_rollback.py", "verify", "--quick", env=env).stdout
    assert "server processes CPU" in text and "this machine CPU" in text, text
