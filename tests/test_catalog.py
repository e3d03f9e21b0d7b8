"""common/points/catalog.py on real files: statuses, names, resolution (no server needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import BackupCorrupt, UsageError
from common.points import catalog


def make(folder: Path, point_id: str, content: bytes = b"PGDMP data", **extra) -> Path:
    dump = folder / f"{point_id}.dump"
    dump.write_bytes(content)
    created = extra.pop("created_at", "2026-01-01T00:00:00+00:00")
    point = catalog.RollbackPoint(id=point_id, database="staging", created_at=created, file=dump.name,
                                  size_bytes=len(content), sha256=catalog.sha256_file(dump), folder=folder, **extra)
    catalog.save(point)
    return dump


def test_statuses_from_cheap_checks(tmp_path):
    make(tmp_path, "staging_20260101_000000_ok")
    make(tmp_path, "staging_20260102_000000_short", created_at="2026-01-02T00:00:00+00:00")
    (tmp_path / "staging_20260102_000000_short.dump").write_bytes(b"PGD")
    make(tmp_path, "staging_20260103_000000_gone", created_at="2026-01-03T00:00:00+00:00")
    (tmp_path / "staging_20260103_000000_gone.dump").unlink()
    (tmp_path / "orphan.dump").write_bytes(b"x")
    (tmp_path / "killed.dump.partial").write_bytes(b"x")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / ".inflight_staging_1234abcd.json").write_text("{}")  # a marker, not a point
    found = {p.id: p.status for p in catalog.scan(tmp_path)}
    assert found == {"staging_20260101_000000_ok": "OK", "staging_20260102_000000_short": "CORRUPT",
                     "staging_20260103_000000_gone": "MISSING", "orphan": "INCOMPLETE", "killed": "INCOMPLETE",
                     "broken": "INVALID"}
    ordered = [p.id for p in catalog.scan(tmp_path) if p.status not in ("INCOMPLETE", "INVALID")]
    assert ordered[0] == "staging_20260103_000000_gone"  # newest first


def test_full_checksum_catches_a_flipped_byte_of_the_same_size(tmp_path):
    dump = make(tmp_path, "staging_20260101_000000_x", b"0123456789" * 100)
    point = catalog.resolve(tmp_path, str(dump))
    catalog.verify_checksum(point)
    data = bytearray(dump.read_bytes())
    data[500] ^= 1
    dump.write_bytes(bytes(data))
    assert catalog.quick_check(catalog.resolve(tmp_path, dump.name.replace(".dump", ""))).status == "OK"
    with pytest.raises(BackupCorrupt, match="sha256"):
        catalog.verify_checksum(catalog.resolve(tmp_path, str(dump)))


def test_names_are_slugged_and_never_collide(tmp_path):
    first = catalog.new_id(tmp_path, 'Stage "Q" DB', "Before migration: test #1")
    assert first.startswith("Stage-Q-DB_") and first.endswith("_Before-migration-test-1")
    (tmp_path / f"{first}.json").write_text("{}")
    second = catalog.new_id(tmp_path, 'Stage "Q" DB', "Before migration: test #1")
    assert second != first and second.startswith(first)


def test_resolve_refuses_what_it_cannot_check(tmp_path):
    (tmp_path / "loose.dump").write_bytes(b"x")
    with pytest.raises(UsageError, match="no sidecar"):
        catalog.resolve(tmp_path, str(tmp_path / "loose.dump"))
    with pytest.raises(UsageError, match="interrupted"):
        catalog.resolve(tmp_path, "x.dump.partial")
    with pytest.raises(UsageError, match="no rollback point"):
        catalog.resolve(tmp_path, "nothing-here")
    dump = make(tmp_path, "staging_20260101_000000_y")
    sidecar = dump.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["id"] = "renamed"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(BackupCorrupt, match="not valid"):
        catalog.resolve(tmp_path, str(dump))
