"""Shared library of the rollback toolkit: settings, logs, PostgreSQL tools, the catalog."""
