"""Alembic environment: runs migrations on the engine triaged hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from triaged.worklist import web_models  # noqa: F401  (registers the web tables)
from triaged.worklist.models import Base

config = context.config
engine = config.attributes.get("engine")
if not isinstance(engine, Engine):  # pragma: no cover - only via triaged.worklist.db
    raise RuntimeError("run migrations through 'triaged db upgrade'")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=engine.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
