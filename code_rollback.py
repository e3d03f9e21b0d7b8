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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cli, coderepo, files, runbooks  # noqa: E402
from common.errors import VerifyProblems  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="code_rollback.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
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
    p = sub.add_parser("cleanup", help="remove backups older than DAYS (the newest stays)")
    p.add_argument("days", type=float)
    p.add_argument("--dry-run", action="store_true")
    cli.common_flags(p, area="code")
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


def auto_backup(ctx, repo_path: Path, backups: Path, why: str) -> None:
    if (repo_path / ".git").exists():
        path = coderepo.backup(coderepo.open_repo(repo_path), backups, reason=why)
        ctx.log.info("Automatic backup of the current state: %s", path)


def publish(ctx, repo_path: Path, deploy: Path) -> None:
    repo = coderepo.open_repo(repo_path)
    release = coderepo.publish(repo, deploy, repo.head.commit.hexsha)
    ctx.log.info("Published %s; %s/current points to it.", release, deploy)


def cmd_restore(args, ctx):
    repo_path, backups, deploy = settings_paths(ctx)
    source = Path(args.path).expanduser().resolve()
    meta = coderepo.load_backup(source)
    ctx.confirm(f"Restore {repo_path} from {source}?", [
        f"commit {(meta['commit'] or '(none)')[:12]} on {meta['branch'] or 'detached HEAD'}, "
        f"{len(meta['dirty_files'])} uncommitted file(s), backed up {meta['created_at']}",
        "the current state is backed up first; ignored files are kept"])
    with files.FolderLock(backups, ctx.script):
        auto_backup(ctx, repo_path, backups, f"automatic before restore of {source.name}")
        coderepo.restore(repo_path, source, meta)
    ctx.log.info("Restored %s to %s on %s (%d uncommitted file(s)).", repo_path, (meta["commit"] or "-")[:12],
                 meta["branch"] or "detached HEAD", len(meta["dirty_files"]))
    if deploy:
        publish(ctx, repo_path, deploy)


def cmd_rollback(args, ctx):
    repo_path, backups, deploy = settings_paths(ctx)
    repo = coderepo.open_repo(repo_path)
    coderepo.refuse_unsafe(repo, allow_detached=False)
    commit = coderepo.resolve_commit(repo, args.commit)
    head = repo.head.commit.hexsha
    if commit == head:
        ctx.log.info("%s is already at %s. Nothing to do.", repo.head.ref.name, commit[:12])
        return
    ctx.confirm(f"Reset branch {repo.head.ref.name} from {head[:12]} to {commit[:12]}?", [
        f"target: {commit[:12]} {repo.commit(commit).summary}",
        "local changes are stashed; the old head is kept under refs/rollback/<ts>"])
    with files.FolderLock(backups, ctx.script):
        auto_backup(ctx, repo_path, backups, f"automatic before rollback to {commit[:12]}")
        result = coderepo.rollback(repo, commit)
    ctx.log.info("Rolled %s back from %s to %s.", result.branch, result.old_head[:12], result.new_head[:12])
    ctx.log.info("  old head kept as %s (git checkout -B %s %s to undo)", result.kept_ref, result.branch, result.kept_ref)
    ctx.log.info("  local changes: %s", f"stashed as {result.stash} (git stash pop to recover)"
                 if result.stash else "none")
    if deploy:
        publish(ctx, repo_path, deploy)


def cmd_verify(args, ctx):
    repo_path, _, deploy = settings_paths(ctx)
    repo = coderepo.open_repo(repo_path)
    problems = [f"git fsck: {line}" for line in coderepo.fsck(repo)]
    state = coderepo.capture(repo)
    report = {"repo": str(repo_path), "head": state.commit, "branch": state.branch, "dirty_files": state.dirty_files}
    if deploy:
        current = coderepo.current_release(deploy)
        deployed = coderepo.release_commit(current)
        report.update(deployment=str(deploy), current=str(current) if current else None, current_commit=deployed)
        if deployed != state.commit:
            problems.append(f"{deploy}/current is {(deployed or 'missing')[:12]}, HEAD is {(state.commit or '-')[:12]}")
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
