"""The PostgreSQL server and its client tools: connections and sessions, database properties,
pg_dump/pg_restore/psql found and checked, PgBouncer, the toolkit's own SQL migrations, and the
health metrics of a server. Nothing here knows about rollback points."""
