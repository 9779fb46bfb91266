"""Engine and session factory for SQLite (default) and PostgreSQL, and schema upgrades.

SQLite gets WAL mode, a busy timeout and foreign keys on every connection so that the
SCP threads, the scheduler and a worker can share one file. Schema changes go through
Alembic only, so an operator's ``triaged db upgrade`` and a fresh ``serve`` agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_MS = 30_000


class DatabaseError(Exception):
    """The database cannot be reached or has a schema we cannot use: an operator problem."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str, log_phi: bool = False) -> Engine:
    """Create an engine; for SQLite the parent folder is created and pragmas are set.

    Bound parameters (Patient ID, accession...) are left out of error messages and SQL
    logging unless ``log_phi`` (``[logging] phi``) asks for them.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise DatabaseError(f"invalid database url: {err}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False},
            hide_parameters=not log_phi,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; emit BEGIN IMMEDIATE ourselves.
        # A deferred transaction that reads and then writes fails at once with "database is
        # locked" (SQLITE_BUSY_SNAPSHOT, no busy wait) when another connection committed in
        # between; taking the write lock up front makes every writer wait its turn instead.
        event.listen(engine, "connect", _no_pysqlite_begin)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=not log_phi
    )


def _no_pysqlite_begin(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
    conn.exec_driver_sql(f"BEGIN {mode}")


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def _first_line(err: OperationalError) -> str:
    return str(err.orig).strip().splitlines()[0] if str(err.orig).strip() else str(err)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``; raises DatabaseError if unreachable."""
    try:
        command.upgrade(_alembic_config(engine), revision)
    except OperationalError as err:
        raise DatabaseError(f"database not reachable: {_first_line(err)}") from None


def ensure_schema(engine: Engine) -> None:
    """Upgrade an empty database; refuse one on an unknown or older revision.

    ``serve`` creates the schema of a new database itself, but upgrading a database that
    holds data is an operator decision (backups first), made with ``triaged db upgrade``.
    """
    try:
        cur = current_revision(engine)
    except OperationalError as err:
        raise DatabaseError(f"database not reachable: {_first_line(err)}") from None
    head = head_revision()
    if cur is None:
        upgrade(engine)
    elif cur != head:
        raise DatabaseError(
            f"database schema is at revision {cur}, this triaged needs {head}: "
            "run 'triaged db upgrade' (after a backup)"
        )
