"""The worklist database: SQLAlchemy models, queries, the job queue, Alembic migrations."""
