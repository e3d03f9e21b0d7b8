"""Rollback points: the catalog and its sidecars, making a point (backup, snapshot, warm copy),
checking one (fingerprint, check), restoring it (plan, fill, restore, in_place, streamcopy),
marks on the databases the toolkit made, cleanup, reports and verify (health)."""
