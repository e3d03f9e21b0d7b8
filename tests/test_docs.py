"""Every shell command in ROLLBACK_GUIDE.md and README.md, run in order as a user would paste it,
against a throwaway server and temporary folders; prompts are answered through a pty."""
from __future__ import annotations

import os
import pty
import re
import select
import shutil
import time
from pathlib import Path

import pytest

from common.testing.demo import SAMPLE_DATA
from tests import pgfixtures as pf
from tests.test_code_rollback import GIT_ENV, commit_all, git

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN_HERE = {"./setup_and_run.sh test": "it is the command that runs this very suite"}
ANSWERS = [("Type 'yes' to continue", "yes"), ("Choice:", "0"), ("Number of the rollback point", "1"),
           ("Description", "from the menu"), ("Commit to roll back to", "HEAD~1")]


def commands(markdown: Path):
    """Lines of ```bash blocks, with backslash continuations joined; comments dropped."""
    found, block, buffered = [], False, ""
    for line in markdown.read_text().splitlines():
        if line.strip().startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        text = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if text.endswith("\\"):
            buffered += text[:-1] + " "
            continue
        text = (buffered + text).strip()
        buffered = ""
        if text:
            found.append(text)
    return found


def run_in_pty(command: str, env: dict, cwd: Path, timeout: float = 180) -> tuple:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a shell running the pasted command
        os.chdir(cwd)
        os.execve("/bin/bash", ["bash", "-c", command], env)
    output, answered, deadline = b"", set(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            text = output.decode("utf-8", "replace")
            for prompt, reply in ANSWERS:
                count = text.count(prompt)
                if count > len([a for a in answered if a[0] == prompt]):
                    answered.add((prompt, count))
                    os.write(fd, (reply + "\n").encode())
        else:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


def newest(folder: Path, pattern: str) -> str:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"nothing matches {pattern} in {folder} yet"
    return str(found[-1])


def substitute(command: str, world: dict) -> str:
    env = world["env"]
    backups, code, config = Path(env["BACKUP_DIR"]), Path(env["CODE_BACKUP_DIR"]), Path(env["CONFIG_BACKUP_DIR"])
    if "/path/to/backup.dump" in command or ("rollback_manager.py" in command and "/path/to/backup" in command):
        command = re.sub(r"/path/to/backup(\.dump)?", newest(backups, "*.dump"), command)
    if "code_rollback.py" in command and "/path/to/backup" in command:
        command = command.replace("/path/to/backup", newest(code, "code_*[0-9]"))
    if "abc123def" in command:
        command = command.replace("abc123def", git(world["repo"], "rev-parse", "--short", "HEAD~1"))
    if "config_rollback.py" in command and "/path/to/backup" in command:
        command = command.replace("/path/to/backup", newest(config, "config_*[0-9]"))
    if "SNAPSHOT_NAME" in command:
        conn = pf.connect(world["server"].info)
        names = pf.rows(conn, "SELECT datname FROM pg_database WHERE datname LIKE 'staging\\_snap\\_%' ORDER BY 1")
        conn.close()
        command = command.replace("SNAPSHOT_NAME", names[-1][0])
    assert "/path/to" not in command, f"a placeholder the test cannot fill: {command}"
    return command


@pytest.fixture
def world(pg_old, tmp_path):
    """V2 at migration 002 with sample data; staging a copy; a repository; a config folder."""
    pf.drop_database(pg_old, "v2")
    pf.drop_database(pg_old, "staging")
    for leftover in pf.rows(pf.connect(pg_old.info), "SELECT datname FROM pg_database WHERE datname LIKE 'staging\\_%'"):
        pf.drop_database(pg_old, leftover[0])
    repo = tmp_path / "app"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    for n in range(3):
        (repo / "app.py").write_text(f"VERSION = {n}\n")
        commit_all(repo, f"release {n}")
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.yml").write_text("key: old\ndatabase:\n  pool: 5\n")
    (tmp_path / "app.env").write_text("API_TOKEN=abc\n")
    migrations = tmp_path / "migrations"
    shutil.copytree(ROOT / "examples" / "migrations", migrations)
    env = pf.script_env(tmp_path, V2_DATABASE_URL=pf.url(pg_old, "v2"), STAGING_DATABASE_URL=pf.url(pg_old, "staging"),
                        MIGRATIONS_DIR=str(migrations), REPO_PATH=str(repo), CODE_BACKUP_DIR=str(tmp_path / "code_backups"),
                        CONFIG_DIR=str(config), CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"),
                        ENV_FILE=str(tmp_path / "app.env"), PG_BIN_DIR=pg_old.bindir, **GIT_ENV,
                        # the release rollback's health check: a busy test machine is not a failed release
                        ROLLBACK_MAX_CPU_PERCENT="100", ROLLBACK_MAX_MEMORY_PERCENT="100",
                        ROLLBACK_WARM_COPIES="0")  # warm copies: test_warm.py; here they would only cost time
    env["PATH"] = os.path.dirname(shutil.which("python3") or "/usr/bin/python3") + ":" + env.get("PATH", "")
    pf.create_database(pg_old, "v2")
    # V2's own migrations take their own rollback points: kept apart from staging's
    v2_env = dict(env, STAGING_DATABASE_URL=env["V2_DATABASE_URL"], BACKUP_DIR=str(tmp_path / "v2_backups"))
    assert pf.run_script("database_rollback.py", "migrate", "001", "--yes", env=v2_env).returncode == 0
    pf.execute(pg_old, "v2", SAMPLE_DATA)
    assert pf.run_script("database_rollback.py", "migrate", "002", "--yes", env=v2_env).returncode == 0
    assert pf.run_script("reset_staging.py", "--yes", env=env).returncode == 0
    yield {"env": env, "repo": repo, "server": pg_old, "tmp": tmp_path}
    for (name,) in pf.rows(pf.connect(pg_old.info), "SELECT datname FROM pg_database WHERE datname LIKE 'staging%' "
                                                  "OR datname LIKE 'v2%'"):
        pf.drop_database(pg_old, name)


@pytest.mark.parametrize("document", ["README.md", "ROLLBACK_GUIDE.md"])
def test_every_command_in_the_document_works(world, document):
    found = commands(ROOT / document)
    assert len(found) >= (30 if document == "ROLLBACK_GUIDE.md" else 5)
    ran = 0
    for command in found:
        if command in NOT_RUN_HERE:
            continue
        pasted = substitute(command, world)
        code, output = run_in_pty(pasted, world["env"], ROOT)
        assert code == 0, f"`{command}` exited {code}:\n{output[-3000:]}"
        assert "Traceback" not in output, f"`{command}`:\n{output[-3000:]}"
        ran += 1
    assert ran == len(found) - sum(1 for c in found if c in NOT_RUN_HERE)
