"""Updating one configuration file so that only what was asked changes (DESIGN §9).

YAML goes through ruamel.yaml in round-trip mode (comments, blank lines, key order, anchors,
aliases, merge keys, quoting and indentation kept); JSON is written back with the file's own
indentation, key order and final newline; env files are edited line by line with python-dotenv's
parser (comments, order, `export` and the other lines kept). Every edit is checked by parsing the
new text and comparing it with the intended data, before the file is written and after."""
from __future__ import annotations

import difflib
import io
import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from dotenv import dotenv_values
from dotenv.parser import parse_stream

from ..errors import RollbackError, UsageError
from ..testing import testhooks
from . import folders
from .configfiles import _MISSING, SECRET_KEY, deep_merge, parse_file

YAML_SUFFIXES, JSON_SUFFIXES = (".yml", ".yaml"), (".json",)
_SECRET_LINE = re.compile(r"""^(?P<head>[ \t]*(?:export[ \t]+)?["']?(?P<key>[A-Za-z0-9_.-]+)["']?[ \t]*[:=][ \t]*)"""
                          r"""(?P<value>\S.*)$""")
_SAFE_ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:@%+,-]*$")


def kind_of(path: Path) -> Optional[str]:
    if path.suffix in YAML_SUFFIXES:
        return "yaml"
    if path.suffix in JSON_SUFFIXES:
        return "json"
    if path.name == ".env" or path.suffix == ".env":
        return "env"
    return None


@dataclass
class Edit:
    """One planned update: the file's text before and after, and what it means."""

    path: Path
    kind: str
    before: str
    after: str
    intended: Any
    changes: List[Tuple[str, Any, Any]]
    notes: List[str] = field(default_factory=list)

    def diff(self) -> List[str]:
        """The unified diff that will be written, secret values masked."""
        lines = difflib.unified_diff(self.before.splitlines(), self.after.splitlines(),
                                     f"{self.path.name} (now)", f"{self.path.name} (after the update)", lineterm="")
        return [mask_line(line) for line in lines]


def mask_line(line: str) -> str:
    """A diff line with the value of a secret-looking key (password, token, ...) replaced by ***."""
    if line.startswith(("---", "+++", "@@")) or not line:
        return line
    sign, body = line[0], line[1:]
    match = _SECRET_LINE.match(body)
    if match and SECRET_KEY.search(match.group("key")):
        return sign + match.group("head") + "***"
    return line


def plan(path: Path, patch: Dict[str, Any]) -> Edit:
    """Work out the new text of the file; refuses (nothing changed) what it cannot write faithfully."""
    kind = kind_of(path)
    before = path.read_text(encoding="utf-8")
    if kind == "env":
        return _plan_env(path, before, patch)
    current = parse_file(path)
    if current is not None and not isinstance(current, dict):
        raise UsageError(f"{path} does not hold a mapping at its top level; cannot merge. Nothing was changed.")
    intended, changes = deep_merge(current or {}, patch)
    edit = Edit(path, kind, before, before, intended, changes)
    if changes:
        edit.after = _yaml_text(before, patch) if kind == "yaml" else _json_text(before, intended, edit.notes)
    if parse_text(kind, edit.after) != intended:
        raise UsageError(f"the updated {path.name} would not read back as the merge of the update; refused "
                         "(a key that only comes from a merge key `<<` cannot be deleted). Nothing was changed.")
    return edit


def parse_text(kind: str, text: str) -> Any:
    if kind == "json":
        return json.loads(text)
    if kind == "yaml":
        return yaml.safe_load(text) or {}
    return dict(dotenv_values(stream=io.StringIO(text)))


def _yaml_text(before: str, patch: Dict[str, Any]) -> str:
    from ruamel.yaml import YAML
    from ruamel.yaml.util import load_yaml_guess_indent

    _, indent, sequence_dash = load_yaml_guess_indent(before)
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 1 << 16  # never fold a long line the owners wrote on one
    indent = indent or 2
    sequence_dash = sequence_dash or 0
    rt.indent(mapping=indent, sequence=sequence_dash + 2, offset=sequence_dash)  # "- " is two wide
    document = rt.load(before)
    if document is None:
        from ruamel.yaml.comments import CommentedMap
        document = CommentedMap()
    _merge_round_trip(document, patch)
    out = io.StringIO()
    rt.dump(document, out)
    return out.getvalue()


def _merge_round_trip(node, patch: Dict[str, Any]) -> None:
    """deep_merge on ruamel's CommentedMap: only changed keys are touched, so every other line keeps
    its quoting and comments; a deleted key takes its end-of-line comment with it."""
    for key, value in patch.items():
        old = node.get(key)
        if value is None:
            if key in node:
                del node[key]
        elif isinstance(value, dict) and isinstance(old, dict):
            _merge_round_trip(old, value)
        elif old != value or key not in node:
            node[key] = value


def _json_text(before: str, intended: Any, notes: List[str]) -> str:
    match = re.search(r"\n([ \t]+)\S", before)
    indent = match.group(1) if match else "  "
    ascii_only = "\\u" in before
    newline = "\n" if before.endswith("\n") else ""
    layout = json.dumps(json.loads(before), indent=indent, ensure_ascii=ascii_only) + newline
    if layout != before:
        notes.append(f"the file is not laid out one key per line (e.g. inline objects): it will be reformatted "
                     f"with indentation {indent!r}, so more lines than the changed ones differ")
    return json.dumps(intended, indent=indent, ensure_ascii=ascii_only) + newline


def _plan_env(path: Path, before: str, patch: Dict[str, Any]) -> Edit:
    for key, value in patch.items():
        if isinstance(value, (dict, list)) or not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", key):
            raise UsageError(f"an env file takes KEY: value pairs with plain values; {key!r} cannot be set to "
                             f"{json.dumps(value)}. Nothing was changed.")
        # A newline (or another control character) would read as a second line, a second KEY=, to
        # every line-based reader of the file, and the masked preview would hide it.
        if value is not None and re.search(r"[\x00-\x1f\x7f]", env_value(value)):
            raise UsageError(f"the value for {key} holds a newline or another control character, which an env "
                             "file cannot carry safely; refused. Nothing was changed.")
    current = parse_text("env", before)
    intended = dict(current)
    changes = []
    for key, value in patch.items():
        if value is None:
            if key in intended:
                changes.append((key, intended.pop(key), _MISSING))
        elif current.get(key) != env_value(value):
            changes.append((key, current.get(key, _MISSING), env_value(value)))
            intended[key] = env_value(value)
    lines, seen = [], set()
    for binding in parse_stream(io.StringIO(before)):
        key = binding.key
        if key in patch and not binding.error:  # every line of the key: the last one would win
            seen.add(key)
            if patch[key] is not None:
                lines.append(env_line(binding.original.string, key, env_value(patch[key])))
        else:
            lines.append(binding.original.string)
    text = "".join(lines)
    for key, value in patch.items():
        if value is not None and key not in seen:
            if text and not text.endswith("\n"):
                text += "\n"
            text += f"{key}={quote_env(env_value(value))}\n"
    edit = Edit(path, "env", before, text, intended, changes)
    if parse_text("env", text) != intended:
        raise UsageError(f"the updated {path.name} would not read back as intended; refused. Nothing was changed.")
    return edit


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def quote_env(value: str, style: str = "") -> str:
    """The value as an env file writes it: in the quotes the line used, else bare when safe."""
    if style == '"' or (style != "'" and "'" in value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if style == "'" or not _SAFE_ENV_VALUE.match(value):
        return "'" + value + "'"
    return value


_ENV_LINE = re.compile(r"""^(?P<lead>\s*(?:export\s+)?[A-Za-z_][A-Za-z0-9_.]*\s*=\s*)"""
                       r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s#]*)(?P<tail>.*?)(?P<nl>\r?\n?)$""", re.S)


def env_line(original: str, key: str, value: str) -> str:
    """The binding's line with its value replaced: `export`, spacing, quotes and a comment kept."""
    match = _ENV_LINE.match(original)
    if not match:
        return f"{key}={quote_env(value)}\n"
    old = match.group("value")
    style = old[0] if old[:1] in ("'", '"') else ""
    return match.group("lead") + quote_env(value, style) + match.group("tail") + (match.group("nl") or "\n")


def write(edit: Edit) -> None:
    """Temporary file, fsync, rename; then read it back: when it is not the intended data, the
    original bytes go back and the update fails (exit 1)."""
    original = edit.path.read_bytes()
    mode = stat.S_IMODE(edit.path.stat().st_mode)
    folders.write_atomic(edit.path, edit.after.encode("utf-8"), mode)
    testhooks.checkpoint("config-update-written")
    try:
        ok = parse_text(edit.kind, edit.path.read_text(encoding="utf-8")) == edit.intended
    except (ValueError, yaml.YAMLError, UnicodeDecodeError):
        ok = False
    if not ok:
        folders.write_atomic(edit.path, original, mode)
        raise RollbackError(f"{edit.path} did not read back as the update intended after it was written; the "
                            "original was put back byte for byte. Nothing was changed.")
