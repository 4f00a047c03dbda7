"""PostgreSQL: the pool and its codecs (pool.py), migrations (migrate.py), the repository that holds every
query of the event path (repository.py, sql/queries.sql)."""

from sfworkflow.db.pool import create_pool, ensure_database, init_connection, is_connection_error, is_transient, q

__all__ = ["create_pool", "ensure_database", "init_connection", "is_connection_error", "is_transient", "q"]
