#!/usr/bin/env python3
"""Configuration rollback for $CONFIG_DIR and $ENV_FILE.

    python3 config_rollback.py backup
    python3 config_rollback.py restore /path/to/backup
    python3 config_rollback.py update config.yml '{"key": "value"}'    # null deletes a key
    python3 config_rollback.py update .env '{"API_URL": "https://..."}' --dry-run   # the diff only
    python3 config_rollback.py verify [--json]
    python3 config_rollback.py cleanup 30 [--dry-run]
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli, journal, runbooks  # noqa: E402
from common.errors import UsageError, VerifyProblems  # noqa: E402
from common.files import configedit, configfiles, folders  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli.command_parser("config_rollback.py", __doc__)
    p = sub.add_parser("backup", help="copy CONFIG_DIR and ENV_FILE with a manifest")
    cli.common_flags(p, destructive=False, area="config", machine=True)
    p = sub.add_parser("restore", help="put every file back byte for byte (after a backup of now)")
    p.add_argument("path", help="a config_<ts> backup folder")
    cli.common_flags(p, area="config")
    p = sub.add_parser("update", help="deep-merge a JSON object into a YAML, JSON or env file, "
                                      "changing only those lines")
    p.add_argument("file", help="relative to CONFIG_DIR, e.g. config.yml; or .env (ENV_FILE)")
    p.add_argument("patch", metavar="JSON", help="e.g. '{\"key\": \"value\"}'; null deletes a key")
    p.add_argument("--dry-run", action="store_true", help="print the diff that would be written; change nothing")
    cli.common_flags(p, area="config")
    p = sub.add_parser("verify", help="every file parses; drift against the newest backup (exit 4 on errors)")
    cli.common_flags(p, destructive=False, area="config", machine=True)
    cli.cleanup_command(sub, area="config")
    return parser


def paths(ctx):
    env_file = ctx.settings.path("ENV_FILE")
    return ctx.settings.path("CONFIG_DIR"), env_file, ctx.settings.path("CONFIG_BACKUP_DIR")


def cmd_backup(args, ctx):
    config_dir, env_file, backups = paths(ctx)
    if not config_dir.is_dir():
        raise UsageError(f"CONFIG_DIR {config_dir} does not exist. Nothing was changed.")
    path = configfiles.backup(config_dir, env_file, backups, reason="manual")
    meta = json.loads((path / configfiles.MANIFEST).read_text())
    if ctx.json:
        ctx.emit_json({"path": str(path), **meta})
    else:
        ctx.log.info("Configuration backup: %s (%d files)", path, len(meta["files"]))


def cmd_restore(args, ctx):
    config_dir, env_file, backups = paths(ctx)
    source = Path(args.path).expanduser().resolve()
    meta = configfiles.load_backup(source)
    d = configfiles.drift(meta, config_dir, env_file)
    ctx.confirm(f"Restore {config_dir} and {env_file} from {source}?", [
        f"{len(meta['files'])} files as of {meta['created_at']}",
        f"changed since: {len(d.changed)}, added since (will be removed): {len(d.added)}, "
        f"removed since (will come back): {len(d.removed)}", "the current state is backed up first"])
    with folders.FolderLock(backups, ctx.script):
        auto = configfiles.backup(config_dir, env_file, backups, reason=f"automatic before restore of {source.name}")
        ctx.log.info("Automatic backup of the current state: %s", auto)
        result = configfiles.restore(source, meta, config_dir, env_file,
                                     present=json.loads((auto / configfiles.MANIFEST).read_text()))
    journal.record(backups, "config", source.name, f"configuration backup {source.name}")
    ctx.log.info("Restored %d file(s), removed %d, %d already matched; checksums verified.",
                 len(result.written), len(result.removed), result.unchanged)
    for name in result.written:
        ctx.log.info("  restored %s", name)
    for name in result.removed:
        ctx.log.info("  removed  %s (it is in %s)", name, auto.name)


def cmd_update(args, ctx):
    config_dir, env_file, backups = paths(ctx)
    target = configfiles.target_file(config_dir, args.file, env_file)
    patch = configfiles.parse_patch(args.patch)
    edit = configedit.plan(target, patch)  # bad input is refused before anything, the backup included
    if not edit.changes:
        ctx.log.info("%s already has these values; nothing to change.", args.file)
        return
    summary = [f"{key}: {configfiles.show_value(key, old)} -> {configfiles.show_value(key, new)}"
               for key, old, new in edit.changes]
    diff = summary + [""] + edit.diff() + [f"note: {n}" for n in edit.notes]
    if args.dry_run:
        ctx.log.info("Dry run: this diff would be written to %s (nothing was changed):", target)
        for line in diff:
            ctx.log.info("%s", line)
        return
    ctx.confirm(f"Update {target}? It will change as this diff shows (secrets masked); the current "
                "configuration is backed up first.", diff)
    with folders.FolderLock(backups, ctx.script):
        auto = configfiles.backup(config_dir, env_file, backups, reason=f"automatic before update of {args.file}")
        configedit.write(edit)
    ctx.log.info("Updated %s (backup first: %s):", target, auto)
    for key, old, new in edit.changes:
        ctx.log.info("  %s: %s -> %s", key, configfiles.show_value(key, old), configfiles.show_value(key, new))


def cmd_verify(args, ctx):
    config_dir, env_file, backups = paths(ctx)
    errors = []
    checked = 0
    for path in sorted(p for p in config_dir.rglob("*") if p.suffix in configfiles.PARSED and p.is_file()):
        checked += 1
        try:
            configfiles.parse_file(path)
        except UsageError as exc:
            errors.append(str(exc))
    if env_file.is_file():
        checked += 1
        errors += configfiles.env_errors(env_file)
    found = folders.list_backups(backups, configfiles.PREFIX, configfiles.MANIFEST)
    chosen, why = journal.reference(backups, "config", found)
    d = configfiles.drift(chosen.metadata, config_dir, env_file) if chosen else None
    report = {"config_dir": str(config_dir), "env_file": str(env_file), "files_checked": checked,
              "parse_errors": errors, "compared_with": str(chosen.path) if chosen else None,
              "reference": why if chosen else None, "drift": d.__dict__ if d else None, "ok": not errors}
    if ctx.json:
        ctx.emit_json(report)
    else:
        ctx.log.info("checked %d file(s) in %s and %s", checked, config_dir, env_file)
        for line in errors:
            ctx.log.info("  parse error: %s", line)
        if d is None:
            ctx.log.info("drift: no backup to compare with")
        else:
            ctx.log.info("drift against %s (%s): %d added, %d removed, %d changed", chosen.path.name, why,
                         len(d.added), len(d.removed), len(d.changed))
            for kind in ("added", "removed", "changed"):
                for name in getattr(d, kind):
                    ctx.log.info("  %s %s", kind, name)
    if errors:
        raise VerifyProblems(f"{len(errors)} file(s) do not parse")


def cmd_cleanup(args, ctx):
    _, _, backups = paths(ctx)
    runbooks.cleanup_backup_folders(ctx, backups, configfiles.PREFIX, configfiles.MANIFEST, args.days, args.dry_run,
                                    "configuration backup")


COMMANDS = {"backup": cmd_backup, "restore": cmd_restore, "update": cmd_update, "verify": cmd_verify,
            "cleanup": cmd_cleanup}


if __name__ == "__main__":
    cli.main("config_rollback", build_parser(), COMMANDS)
