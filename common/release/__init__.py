"""The release rollback: one record naming the configuration, code and database backups of a
release, and the steps that put all three back in order."""
