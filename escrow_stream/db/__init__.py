"""PostgreSQL: connection pool, migrations and the mirror's repositories."""
