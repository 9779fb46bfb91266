"""Tables of the web front end: users, login sessions, radiologist feedback, audit log.

They live beside the worklist tables (same ``Base``, same Alembic history) because
feedback and audit entries refer to studies, and because several ``serve`` processes on
one PostgreSQL must agree on who is logged in. Sessions are stored server-side (only a
hash of the session token) so that logging out or removing a user ends the session
everywhere at once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from triaged.worklist.models import Base, UTCDateTime


class User(Base):
    """A web user kept in the database (users may also come from ``[web] users``)."""

    __tablename__ = "web_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class WebSession(Base):
    """A login session: the cookie carries the token, the table only its SHA-256."""

    __tablename__ = "web_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    client: Mapped[str | None] = mapped_column(String(64))


class Feedback(Base):
    """A radiologist's verdict on a study's finding; the source of retraining labels.

    ``label`` is fixed when the feedback is given (confirm a positive finding = covid,
    refute it = non-covid, and the reverse for a negative finding), so a later re-score
    cannot change what the radiologist said.
    """

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    user_name: Mapped[str] = mapped_column(String(64), nullable=False)
    verdict: Mapped[str] = mapped_column(String(8), nullable=False)
    label: Mapped[str] = mapped_column(String(16), nullable=False)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class AuditEntry(Base):
    """Who looked at which study and who changed what, from where and when."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    user_name: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    target: Mapped[str | None] = mapped_column(String(200))
    client: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
