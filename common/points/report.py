"""How rollback points are shown to a person: the `list` table and the `info` lines."""
from __future__ import annotations

from typing import List, Optional

from ..progress import human_size
from . import catalog
from .catalog import RollbackPoint


def _drill_text(p: RollbackPoint) -> str:
    from .drill import text  # drill imports the restore machinery; the table needs only its words
    return text(p)


def points_table(points: List[RollbackPoint], server_known: bool = True) -> str:
    if not points:
        return "No rollback points."
    header = ("#", "ID", "CREATED", "DESCRIPTION", "KIND", "DATABASE", "SIZE", "WARM", "MIGRATION", "STATUS")
    body = []
    for n, p in enumerate(points, 1):
        status = p.status + (f" ({p.problem})" if p.problem and p.status != "OK" else "")
        if p.last_drill:
            status += f", {_drill_text(p)}" if p.last_drill.get("ok") else ", LAST DRILL FAILED"
        body.append((str(n), p.id, p.created_at.replace("T", " ")[:19], _cut(p.description, 30), p.kind,
                     p.database or "?", human_size(p.size_bytes) if p.size_bytes else "-",
                     (human_size(p.warm_size_bytes or 0) if server_known else "unknown") if p.warm_database else "-",
                     catalog.heads_text(p), status))
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header) - 1)]
    lines = []
    for row in [header] + body:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)


def point_details(p: RollbackPoint) -> List[str]:
    lines = [
        f"id:             {p.id}",
        f"status:         {p.status}" + (f" ({p.problem})" if p.problem else ""),
        f"description:    {p.description or '-'}",
        f"kind:           {p.kind}",
        f"database:       {p.database}",
        f"source:         {p.source_url}",
        f"created:        {p.created_at}",
        f"server version: {p.server_version}",
        f"method:         {p.method}, compression {p.compression or '-'}",
        f"tool:           {p.tool}",
    ]
    if p.path:
        lines.append(f"file:           {p.path}")
    if p.snapshot_database:
        lines.append(f"snapshot db:    {p.snapshot_database}")
    if p.warm_database:
        lines.append(f"warm copy:      {p.warm_database} ({human_size(p.warm_size_bytes or 0)}, sealed: a rollback "
                     "swaps it in, then re-arms it)")
    elif p.kind == "dump":
        lines.append("warm copy:      none (a rollback restores the dump)")
    if p.kind == "dump":
        lines.append(f"restore with:   {p.restore_with or 'nothing found on this machine'}")
    lines.append(f"last drill:     {_drill_text(p)}" + (f" (with {p.last_drill['tools']})" if p.last_drill else ""))
    lines += [
        f"size:           {human_size(p.size_bytes)} ({p.size_bytes} bytes)",
        f"sha256:         {p.sha256 or '-'}",
        f"migration head: {catalog.heads_text(p)}",
        f"duration:       {p.duration_seconds:.1f} s",
        f"tables:         {len(p.tables)} ({p.rows} rows)",
    ]
    lines += [f"  {name}: {count}" for name, count in sorted(p.tables.items())]
    return lines


def created_lines(p: RollbackPoint) -> List[str]:
    return [
        f"Rollback point created: {p.id}",
        f"  file:     {p.path}" if p.path else f"  database: {p.snapshot_database} (server-side snapshot)",
        f"  size:     {human_size(p.size_bytes)}",
        f"  method:   {p.method} ({p.tool_version}), compression {p.compression or '-'}",
        f"  tables:   {len(p.tables)} ({p.rows} rows), migration head {catalog.heads_text(p)}",
        f"  duration: {p.duration_seconds:.1f} s" + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in p.timings.items())
                                                     + ")" if len(p.timings) > 1 else ""),
    ] + ([f"  warm:     {p.warm_database} ({human_size(p.warm_size_bytes or 0)}), sealed: a rollback to this "
          "point swaps it in"] if p.warm_database else [])


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def held_lines(held: dict, database: Optional[str]) -> List[str]:
    """Replaced databases and the disk the toolkit holds, under the `list` table."""
    lines = [""]
    if held.get("reachable"):
        if held["replaced"]:
            lines.append(f"Replaced databases of {database} (kept for undoing a rollback; ROLLBACK_KEEP_REPLACED):")
            lines += [f"  {r['database']}  {human_size(r['bytes'])}" for r in held["replaced"]]
        lines.append(f"Disk held by the toolkit: {human_size(held['total_bytes'])} (dumps {human_size(held['dump_bytes'])}, "
                     f"warm copies {human_size(held['warm_bytes'])}, snapshots {human_size(held['snapshot_bytes'])}, "
                     f"replaced databases {human_size(sum(r['bytes'] for r in held['replaced']))})")
    else:
        lines.append(f"Disk held by the toolkit: dumps {human_size(held['dump_bytes'])}; on the server: unknown")
    return lines
