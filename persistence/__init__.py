"""PostgreSQL/SQLite persistence: tables, migrations, the unit of work and the built-in ledger."""
