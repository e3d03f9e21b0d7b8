"""setup_and_run.sh: the menu driven through a pty, direct choices, and the demo."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from tests import pgfixtures as pf
from tests.test_docs import world  # noqa: F401  (the fixture: V2, staging, repository, config)

ROOT = Path(__file__).resolve().parent.parent


class Terminal:
    """The menu in a pseudo-terminal: wait for text, type a line."""

    def __init__(self, argv, env, cwd=ROOT):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        self.output = ""
        self.mark = 0

    def _pump(self) -> bool:
        """Read what the terminal shows (waiting at most 0.2 s); False once it has closed."""
        ready, _, _ = select.select([self.fd], [], [], 0.2)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:
            chunk = b""
        self.output += chunk.decode("utf-8", "replace")
        return bool(chunk)

    def expect(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output[self.mark:]:
            assert time.monotonic() < deadline, f"never saw {text!r}; got:\n{self.output[self.mark:][-2000:]}"
            open_ = self._pump()
            assert open_ or text in self.output[self.mark:], f"ended before {text!r}:\n{self.output[self.mark:][-2000:]}"
        seen = self.output[self.mark:]
        self.mark = self.output.index(text, self.mark) + len(text)
        return seen

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode())

    def wait(self) -> int:
        while True:
            self._pump()
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)


def points(env):
    return json.loads(pf.run_script("rollback_manager.py", "list", "--json", env=env).stdout)["points"]


def test_the_menu_runs_every_choice(world):  # noqa: F811
    env, server = world["env"], world["server"]
    term = Terminal(["/bin/bash", str(ROOT / "setup_and_run.sh")], env)
    term.expect("Choice:")
    term.send("42\n")
    assert "Invalid choice" in term.expect("Choice:")
    term.send("abc\n")
    assert "Invalid choice" in term.expect("Choice:")
    term.send("1\n")
    assert "Dependencies installed." in term.expect("Choice:")
    term.send("2\n")
    seen = term.expect("Choice:")
    assert "STAGING_DATABASE_URL: postgresql://postgres:***@" in seen and f"PostgreSQL {server.major}" in seen
    assert "exit status 0" in seen
    term.send("3\n")
    assert "002_order_status" in term.expect("Choice:")
    term.send("5\n")
    term.expect("Description")
    term.send("from the menu\n")
    assert "Rollback point created" in term.expect("Choice:")
    assert [p["description"] for p in points(env)] == ["from the menu"]
    before = pf.fingerprint(server, "staging")
    term.send("6\n")
    assert "from the menu" in term.expect("Choice:")
    term.send("4\n")
    seen = term.expect("Choice:")
    assert "--- database" in seen and "--- code" in seen and "--- configuration" in seen and "exit status 0" in seen
    for choice, prompts in (("7", []), ("8", [("Number of the rollback point", "1")])):
        pf.execute(server, "staging", "DELETE FROM orders WHERE id > 100")
        term.send(choice + "\n")
        for prompt, answer in prompts + [("Type 'yes' to continue", "yes")]:
            term.expect(prompt)
            term.send(answer + "\n")
        assert "exit status 0" in term.expect("Choice:")
        assert pf.fingerprint(server, "staging") == before, f"choice {choice}"
    pf.execute(server, "staging", "CREATE TABLE scratch (id int)")
    term.send("9\n")
    term.expect("Type 'yes' to continue")
    term.send("no\n")
    assert "declined" in term.expect("Choice:")
    assert "public.scratch" in pf.row_fingerprint(server, "staging")
    term.send("9\n")
    term.expect("Type 'yes' to continue")
    term.send("yes\n")
    assert "exit status 0" in term.expect("Choice:")
    assert pf.fingerprint(server, "staging") == pf.fingerprint(server, "v2")
    term.send("\x04")  # Ctrl-D
    term.expect("Bye.")
    assert term.wait() == 0


def test_zero_exits_and_direct_choices_pass_arguments_on(world):  # noqa: F811
    env = world["env"]
    term = Terminal(["/bin/bash", str(ROOT / "setup_and_run.sh")], env)
    term.expect("Choice:")
    term.send("0\n")
    term.expect("Bye.")
    assert term.wait() == 0
    run = lambda *a: subprocess.run([str(ROOT / "setup_and_run.sh"), *a], env=env, capture_output=True, text=True,  # noqa: E731
                                    stdin=subprocess.DEVNULL, timeout=300)
    made = run("5", "direct point")
    assert made.returncode == 0, made.stderr
    listed = run("6", "--json")
    assert [p["description"] for p in json.loads(listed.stdout)["points"]] == ["direct point"]
    refused = run("7")
    assert refused.returncode == 3 and "--yes" in refused.stderr
    assert run("7", "--yes").returncode == 0
    assert run("8", "1", "--yes").returncode == 0
    assert run("99").returncode == 2
    assert run("11", "HEAD~1", "--yes").returncode == 0


def test_the_demo_runs_and_leaves_nothing_running(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    result = subprocess.run([str(ROOT / "setup_and_run.sh"), "demo"], env=env, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for line in ("Rollback point created", "applied 003_archive_old_orders", "verification: OK",
                 "drift:          none", "Demo complete", "Throwaway server stopped"):
        assert line in out
    data = re.search(r"data in (\S+)", out).group(1)
    assert not Path(data).exists()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            assert data not in (proc / "cmdline").read_bytes().decode("utf-8", "replace")
        except OSError:
            pass


def test_a_python_without_the_requirements_gets_one_clear_line_or_the_toolkit_s_venv():
    """`python3 SCRIPT.py` as the README prints it: a Python that lacks psycopg2 runs the script again
    under the toolkit's .venv when there is one, else says in one line what to run; no traceback."""
    for script in ("quick_rollback.py", "rollback_manager.py", "code_rollback.py"):
        result = subprocess.run([sys.executable, "-S", str(ROOT / script), "--help"], capture_output=True, text=True,
                                env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}, cwd="/")
        assert "Traceback" not in result.stderr, result.stderr
        if (ROOT / ".venv" / "bin" / "python").exists():
            assert result.returncode == 0 and "usage:" in result.stdout, result.stdout + result.stderr
        else:
            assert result.returncode == 2 and "./setup_and_run.sh 1" in result.stderr, result.stdout + result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
