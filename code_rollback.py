#!/usr/bin/env python3
"""Code rollback for the git repository at $REPO_PATH.

    python3 code_rollback.py backup
    python3 code_rollback.py restore /path/to/backup     # exactly as backed up (after a backup of now)
    python3 code_rollback.py rollback abc123def          # reset the branch; nothing is lost
    python3 code_rollback.py verify [--json]
    python3 code_rollback.py cleanup 30 [--dry-run]

With $DEPLOYMENT_DIR set, restore and rollback publish the result to
$DEPLOYMENT_DIR/releases/<ts>_<sha>/ and switch $DEPLOYMENT_DIR/current atomically."""
import argparse
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import venv  # noqa: E402

venv.ensure()  # runs again under the toolkit's .venv when this Python lacks its requirements

from common import cli, journal, runbooks  # noqa: E402
from common.errors import UsageError, VerifyProblems  # noqa: E402
from common.files import coderepo, folders, inplace, publish  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli.command_parser("code_rollback.py", __doc__)
    p = sub.add_parser("backup", help="bundle every ref plus the uncommitted state")
    cli.common_flags(p, destructive=False, area="code", machine=True)
    p = sub.add_parser("restore", help="put the repository back exactly as in a backup")
    p.add_argument("path", help="a code_<ts> backup folder")
    cli.common_flags(p, area="code")
    p = sub.add_parser("rollback", help="reset the current branch to a commit (stash, keep the old head)")
    p.add_argument("commit", help="hash, tag, HEAD~2, ...")
    cli.common_flags(p, area="code")
    p = sub.add_parser("verify", help="integrity, HEAD, dirty files, deployment (exit 4 on a problem)")
    cli.common_flags(p, destructive=False, area="code", machine=True)
    cli.cleanup_command(sub, area="code")
    return parser


def settings_paths(ctx):
    deploy = ctx.settings.get("DEPLOYMENT_DIR")
    return ctx.settings.path("REPO_PATH"), ctx.settings.path("CODE_BACKUP_DIR"), \
        (ctx.settings.path("DEPLOYMENT_DIR") if deploy else None)


def cmd_backup(args, ctx):
    repo_path, backups, _ = settings_paths(ctx)
    path = coderepo.backup(coderepo.open_repo(repo_path), backups, reason="manual")
    meta = coderepo.load_backup(path)
    if ctx.json:
        ctx.emit_json({"path": str(path), **meta})
        return
    ctx.log.info("Code backup: %s", path)
    ctx.log.info("  commit %s on %s, %s", (meta["commit"] or "(none)")[:12], meta["branch"] or "detached HEAD",
                 f"{len(meta['dirty_files'])} uncommitted file(s)" if meta["dirty"] else "clean")


def auto_backup(ctx, repo_path: Path, backups: Path, why: str, include_ignored=()) -> Optional[Path]:
    if (repo_path / ".git").exists():
        path = coderepo.backup(coderepo.open_repo(repo_path), backups, reason=why, include_ignored=include_ignored)
        ctx.log.info("Automatic backup of the current state (every file as it is on disk%s): %s",
                     f", {len(include_ignored)} ignored file(s) that will be written over included"
                     if include_ignored else "", path)
        return path
    return None


def at_risk_lines(preview: dict) -> list:
    """The confirmation's lines for what a restore writes over beyond tracked and untracked files."""
    lines = []
    for key, text in (("ignored", "ignored file(s) the backup has at the same path: replaced"),
                      ("nested", "nested repositories: put back as the backup has them"),
                      ("submodules", "submodule working trees: put back as the backup has them")):
        if preview[key]:
            lines.append(f"{len(preview[key])} {text} (the current ones go into the automatic backup first): "
                         + ", ".join(preview[key][:10]) + (" ..." if len(preview[key]) > 10 else ""))
    return lines


def _cwd_inside(repo_path: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == repo_path.resolve() or repo_path.resolve() in cwd.parents


def publish_head(ctx, repo_path: Path, deploy: Path) -> None:
    repo = coderepo.open_repo(repo_path)
    release = publish.publish(repo, deploy, repo.head.commit.hexsha)
    ctx.log.info("Published %s; %s/current points to it.", release, deploy)


def cmd_restore(args, ctx):
    repo_path, backups, deploy = settings_paths(ctx)
    source = Path(args.path).expanduser().resolve()
    meta = coderepo.load_backup(source)
    coderepo.refuse_layout(repo_path.resolve())
    in_place = inplace.why_in_place(repo_path.resolve())
    ctx.confirm(f"Restore {repo_path} from {source}?", [
        f"commit {(meta['commit'] or '(none yet)')[:12]} on {meta['branch'] or 'detached HEAD'}, "
        f"{len(meta['dirty_files'])} uncommitted file(s), backed up {meta['created_at']}",
        "the current state is backed up first (every file as it is on disk); other ignored files are kept",
        *([f"in place, file by file, because {in_place}"] if in_place else []),
        *at_risk_lines(coderepo.restore_preview(repo_path, source, meta))])
    inside = _cwd_inside(repo_path)
    why = f"automatic before restore of {source.name}"
    with folders.FolderLock(backups, ctx.script):
        swapped = coderepo.restore(repo_path, source, meta,
                                   backup_first=lambda at_risk: auto_backup(ctx, repo_path, backups, why, at_risk))
    journal.record(backups, "code", source.name, f"code backup {source.name}")
    ctx.log.info("Restored %s to %s on %s (%d uncommitted file(s)).", repo_path, (meta["commit"] or "-")[:12],
                 meta["branch"] or "detached HEAD", len(meta["dirty_files"]))
    if inside and swapped:
        ctx.log.warning("Your shell's current folder was inside %s, which was swapped for the restored one: run "
                        "`cd %s` to see the restored files.", repo_path, repo_path)
    if deploy:
        publish_head(ctx, repo_path, deploy)


def cmd_rollback(args, ctx):
    repo_path, backups, deploy = settings_paths(ctx)
    repo = coderepo.open_repo(repo_path)
    coderepo.refuse_unsafe(repo, allow_detached=False)
    commit = coderepo.resolve_commit(repo, args.commit)
    head = repo.head.commit.hexsha
    if commit == head:
        ctx.log.info("%s is already at %s. Nothing to do.", repo.head.ref.name, commit[:12])
        return
    at_risk = coderepo.rollback_at_risk(repo, commit)
    flagged = coderepo.flagged_edits(repo)
    lines = [f"target: {commit[:12]} {repo.commit(commit).summary}",
             "local changes are stashed; the old head is kept under refs/rollback/<ts>; every file is in the "
             "automatic backup first"]
    if at_risk:
        lines.append(f"{len(at_risk)} ignored file(s) the target commit tracks will be overwritten (in the automatic "
                     f"backup first): {', '.join(at_risk[:10])}")
    if flagged:
        lines.append(f"{len(flagged)} edited file(s) marked assume-unchanged or skip-worktree, which a stash does not "
                     f"save (in the automatic backup): {', '.join(p for p, _ in flagged[:10])}")
    ctx.confirm(f"Reset branch {repo.head.ref.name} from {head[:12]} to {commit[:12]}?", lines)
    with folders.FolderLock(backups, ctx.script):
        auto_backup(ctx, repo_path, backups, f"automatic before rollback to {commit[:12]}", at_risk)
        result = coderepo.rollback(repo, commit, expected_head=head)
    ctx.log.info("Rolled %s back from %s to %s.", result.branch, result.old_head[:12], result.new_head[:12])
    ctx.log.info("  old head kept as %s (git checkout -B %s %s to undo)", result.kept_ref, result.branch, result.kept_ref)
    ctx.log.info("  local changes: %s", f"stashed as {result.stash}" if result.stash else "none stashed")
    if deploy:
        publish_head(ctx, repo_path, deploy)


def cmd_verify(args, ctx):
    repo_path, backups, deploy = settings_paths(ctx)
    repo = coderepo.open_repo(repo_path)
    problems = [f"git fsck: {line}" for line in coderepo.fsck(repo)]
    try:
        inplace.refuse_interrupted(repo_path, Path(repo.git_dir))
    except UsageError as exc:
        problems.append(str(exc).replace(" Nothing was changed.", ""))
    state = coderepo.capture(repo)
    report = {"repo": str(repo_path), "head": state.commit, "branch": state.branch, "dirty_files": state.dirty_files}
    if deploy:
        current = publish.current_release(deploy)
        deployed = publish.release_commit(current)
        report.update(deployment=str(deploy), current=str(current) if current else None, current_commit=deployed)
        if deployed != state.commit:
            problems.append(f"{deploy}/current is {(deployed or 'missing')[:12]}, HEAD is {(state.commit or '-')[:12]}")
    chosen, why = journal.reference(backups, "code", folders.list_backups(backups, coderepo.PREFIX, coderepo.METADATA))
    d = None
    if chosen:
        try:
            d = coderepo.drift(repo, chosen.path, coderepo.load_backup(chosen.path))  # checksums first
        except UsageError as exc:
            problems.append(f"cannot compare with {chosen.path}: {str(exc).replace(' Nothing was changed.', '')}")
            chosen = None
    report.update(compared_with=str(chosen.path) if chosen else None, reference=why if chosen else None, drift=d)
    report.update(problems=problems, ok=not problems)
    if ctx.json:
        ctx.emit_json(report)
    else:
        ctx.log.info("repository: %s", repo_path)
        ctx.log.info("HEAD:       %s on %s", (state.commit or "(no commit)")[:12], state.branch or "detached HEAD")
        ctx.log.info("state:      %s", f"dirty ({len(state.dirty_files)} file(s))" if state.dirty else "clean")
        for name in state.dirty_files[:50]:
            ctx.log.info("  %s", name)
        if deploy:
            ctx.log.info("deployment: current -> %s", report.get("current") or "(none)")
        if d is None:
            ctx.log.info("drift:      no backup to compare with")
        else:
            ctx.log.info("drift against %s (%s): %s; %d added, %d removed, %d changed", chosen.path.name, why,
                         d["head"] or "same HEAD and branch", len(d["added"]), len(d["removed"]), len(d["changed"]))
            for kind in ("added", "removed", "changed"):
                for name in d[kind][:50]:
                    ctx.log.info("  %s %s", kind, name)
        ctx.log.info("problems:   %s", "none" if not problems else len(problems))
        for line in problems:
            ctx.log.info("  %s", line)
    if problems:
        raise VerifyProblems(f"{len(problems)} problem(s) in {repo_path}")


def cmd_cleanup(args, ctx):
    _, backups, _ = settings_paths(ctx)
    runbooks.cleanup_backup_folders(ctx, backups, coderepo.PREFIX, coderepo.METADATA, args.days, args.dry_run,
                                    "code backup")


COMMANDS = {"backup": cmd_backup, "restore": cmd_restore, "rollback": cmd_rollback, "verify": cmd_verify,
            "cleanup": cmd_cleanup}


if __name__ == "__main__":
    cli.main("code_rollback", build_parser(), COMMANDS)
