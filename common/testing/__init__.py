"""Test-only parts: the throwaway PostgreSQL servers of the suite and the demo, the demo itself,
and the named checkpoints (inert unless a test sets ROLLBACK_TEST_PAUSE_AT or _FAIL_AT)."""
