"""PostgreSQL store: pool, migrations, embedded server, and one module per table family."""
