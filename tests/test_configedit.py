"""config_rollback.py update keeps a file as its owners wrote it: only the asked-for lines change
(common/files/configedit.py), on real files, through the script as an operator runs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from common.files.configfiles import deep_merge
from tests import pgfixtures as pf

APP_YML = """\
# Application settings: reviewed by the platform team.
defaults: &defaults
  timeout: 30   # seconds
  retries: 3

server:
  <<: *defaults
  host: "0.0.0.0"
  workers: 4  # do not change without finance
  name: 'shop'
  obsolete: yes   # remove after 2026
  motd: |
    Welcome,
    stranger.
  tags:
  - "blue"
  - green

# Logging
logging:
  level: info
  greeting: "héllo ✓ 日本語"
"""

INDENTED_SEQ_YML = """\
service:
    name: api
    hosts:
      - a.example.com
      - b.example.com
    db:
        pool: 5
"""


def run(tmp_path, *args, env_file=None):
    config = tmp_path / "config"
    env = pf.script_env(tmp_path, CONFIG_DIR=str(config), CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"),
                        ENV_FILE=str(env_file or tmp_path / "absent.env"))
    return pf.run_script("config_rollback.py", *args, env=env)


def write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / "config" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def changed_lines(before: str, after: str) -> tuple:
    """(removed lines, added lines) of a line diff."""
    import difflib
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


YAML_CASES = [
    ('{"server": {"workers": 8}}', ["  workers: 4  # do not change without finance"],
     ["  workers: 8  # do not change without finance"]),
    ('{"server": {"obsolete": null}}', ["  obsolete: yes   # remove after 2026"], []),
    ('{"logging": {"format": "json"}}', [], ["  format: json"]),
    ('{"server": {"timeout": 60}}', [], ["  timeout: 60"]),  # overrides the merge key, anchor untouched
    ('{"server": {"host": "127.0.0.1"}}', ['  host: "0.0.0.0"'], ['  host: "127.0.0.1"']),
]


@pytest.mark.parametrize("patch,removed,added", YAML_CASES, ids=["change", "delete", "add", "merge-key", "quoted"])
def test_a_yaml_update_changes_exactly_its_own_lines(tmp_path, patch, removed, added):
    path = write(tmp_path, "app.yml", APP_YML)
    intended, _ = deep_merge(yaml.safe_load(APP_YML), json.loads(patch))
    result = run(tmp_path, "update", "app.yml", patch, "--yes")
    assert result.returncode == 0, result.stderr
    after = path.read_text(encoding="utf-8")
    assert changed_lines(APP_YML, after) == (removed, added), after
    assert yaml.safe_load(after) == intended
    assert "defaults: &defaults" in after and "<<: *defaults" in after and "# Logging" in after


def test_yaml_with_four_space_mappings_and_indented_sequences_keeps_them(tmp_path):
    path = write(tmp_path, "svc.yaml", INDENTED_SEQ_YML)
    result = run(tmp_path, "update", "svc.yaml", '{"service": {"db": {"pool": 9, "ssl": true}}}', "--yes")
    assert result.returncode == 0, result.stderr
    assert changed_lines(INDENTED_SEQ_YML, path.read_text()) == (["        pool: 5"], ["        pool: 9", "        ssl: true"])


@pytest.mark.parametrize("indent", ["  ", "    ", "\t"], ids=["2-spaces", "4-spaces", "tab"])
def test_a_json_update_keeps_indentation_order_and_final_newline(tmp_path, indent):
    data = {"url": "https://pay.example.com", "retries": 3, "nested": {"b": 1, "a": [1, 2]}, "name": "Zoë"}
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    path = write(tmp_path, "gateway.json", text)
    result = run(tmp_path, "update", "gateway.json", '{"retries": 5}', "--yes")
    assert result.returncode == 0, result.stderr
    after = path.read_text(encoding="utf-8")
    assert changed_lines(text, after) == ([f'{indent}"retries": 3,'], [f'{indent}"retries": 5,'])
    assert after.endswith("}\n") and list(json.loads(after)) == list(data)


def test_a_json_file_with_inline_objects_is_reformatted_and_the_confirmation_says_so(tmp_path):
    text = '{"url": "https://pay", "retries": 3}'
    path = write(tmp_path, "inline.json", text)
    result = run(tmp_path, "update", "inline.json", '{"retries": 4}', "--yes")
    assert result.returncode == 0, result.stderr
    assert "will be reformatted" in result.stdout
    assert json.loads(path.read_text()) == {"url": "https://pay", "retries": 4}
    assert not path.read_text().endswith("\n")  # none before, none after


ENV_TEXT = """\
# Database
export DB_HOST=db.internal   # primary
DB_PASSWORD='s3cret'
FEATURE_X="on"

# Payments
PAYMENT_URL=https://pay.example.com
"""


def test_an_env_update_sets_adds_and_deletes_keys_keeping_every_other_line(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_TEXT)
    patch = '{"DB_HOST": "db2.internal", "FEATURE_X": null, "NEW_KEY": "a b", "DB_PASSWORD": "n3w-pw"}'
    result = run(tmp_path, "update", ".env", patch, "--yes", env_file=env_file)
    assert result.returncode == 0, result.stderr
    after = env_file.read_text()
    assert changed_lines(ENV_TEXT, after) == (
        ["export DB_HOST=db.internal   # primary", "DB_PASSWORD='s3cret'", 'FEATURE_X="on"'],
        ["export DB_HOST=db2.internal   # primary", "DB_PASSWORD='n3w-pw'", "NEW_KEY='a b'"])
    assert dotenv_values(env_file) == {"DB_HOST": "db2.internal", "DB_PASSWORD": "n3w-pw",
                                       "PAYMENT_URL": "https://pay.example.com", "NEW_KEY": "a b"}
    assert "s3cret" not in result.stdout + result.stderr and "n3w-pw" not in result.stdout + result.stderr


def test_an_env_file_under_config_dir_can_be_updated(tmp_path):
    path = write(tmp_path, "services/worker.env", "# worker\nCONCURRENCY=2\n")
    result = run(tmp_path, "update", "services/worker.env", '{"CONCURRENCY": 4}', "--yes")
    assert result.returncode == 0, result.stderr
    assert path.read_text() == "# worker\nCONCURRENCY=4\n"


def test_the_confirmation_shows_the_masked_diff_and_dry_run_changes_nothing(tmp_path):
    text = "db:\n  host: a\n  password: hunter2  # rotate monthly\n"
    path = write(tmp_path, "db.yml", text)
    dry = run(tmp_path, "update", "db.yml", '{"db": {"password": "n3w", "host": "b"}}', "--dry-run")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert "-  host: a" in out and "+  host: b" in out
    assert "-  password: ***" in out and "+  password: ***" in out
    assert "hunter2" not in out and "n3w" not in out and "Dry run" in out
    assert path.read_text() == text and not (tmp_path / "config_backups").exists()
    declined = run(tmp_path, "update", "db.yml", '{"db": {"host": "b"}}')  # no terminal, no --yes
    assert declined.returncode == 3 and "+  host: b" in declined.stdout
    assert path.read_text() == text


def test_a_write_that_does_not_read_back_puts_the_original_back(tmp_path):
    path = write(tmp_path, "app.yml", APP_YML)
    config = tmp_path / "config"
    env = pf.script_env(tmp_path, CONFIG_DIR=str(config), CONFIG_BACKUP_DIR=str(tmp_path / "config_backups"))
    proc, flag = pf.start_paused("config_rollback.py", "update", "app.yml", '{"server": {"workers": 8}}', "--yes",
                                 env=env, step="config-update-written", folder=tmp_path)
    path.write_text("server: {workers: 99}\n")  # someone else's write lands between ours and the check
    flag.unlink()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "original was put back" in err
    assert path.read_text(encoding="utf-8") == APP_YML
