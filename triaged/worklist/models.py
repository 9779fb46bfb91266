"""SQLAlchemy models of the worklist database.

The schema mirrors the DICOM information model (study -> series -> instance) plus what
triaged adds: associations (who sent what), jobs (the scoring queue with leases), study
events (every state change, so the timeline and restarts are exact), results and
deliveries. Alembic migrations under ``migrations/`` create it; never ``create_all`` in
production code.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StudyState(enum.StrEnum):
    """Where a study is on its way through triaged (DESIGN.md, 'One study's way')."""

    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    QUEUED = "QUEUED"
    SCORING = "SCORING"
    SCORED = "SCORED"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class AssociationState(enum.StrEnum):
    OPEN = "OPEN"
    RELEASED = "RELEASED"
    ABORTED = "ABORTED"


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    DEAD = "DEAD"
    SUPERSEDED = "SUPERSEDED"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite drops the zone, PostgreSQL keeps it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the worklist database")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), nullable=False)


def _ts_null() -> Mapped[datetime | None]:
    return mapped_column(UTCDateTime(), nullable=True)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(128))
    requested_priority: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    flag: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    first_received_at: Mapped[datetime] = _ts()
    last_received_at: Mapped[datetime] = _ts()
    completed_at: Mapped[datetime | None] = _ts_null()
    scored_at: Mapped[datetime | None] = _ts_null()
    delivered_at: Mapped[datetime | None] = _ts_null()
    updated_at: Mapped[datetime] = _ts()

    series: Mapped[list[Series]] = relationship(back_populates="study", lazy="raise")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = _ts()

    study: Mapped[Study] = relationship(back_populates="series", lazy="raise")


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16), nullable=False)
    peer: Mapped[str] = mapped_column(String(64), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    started_at: Mapped[datetime] = _ts()
    ended_at: Mapped[datetime | None] = _ts_null()
    instances_stored: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), nullable=False, index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    received_at: Mapped[datetime] = _ts()
    file_missing: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class Job(Base):
    """A unit of work on a study; leased by one worker at a time."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="score")
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = _ts_null()
    created_at: Mapped[datetime] = _ts()
    started_at: Mapped[datetime | None] = _ts_null()
    finished_at: Mapped[datetime | None] = _ts_null()
    error: Mapped[str | None] = mapped_column(Text)


class StudyEvent(Base):
    """One recorded state change: the study's timeline and audit of what happened."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = _ts()


class Result(Base):
    """A scoring result; a newer result of the same study supersedes older ones."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), nullable=False, unique=True)
    pipeline: Mapped[str] = mapped_column(String(64), nullable=False)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    fusion_probability: Mapped[float | None] = mapped_column(Float)
    cbam_probability: Mapped[float | None] = mapped_column(Float)
    models: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False, default=dict)
    slice_probabilities: Mapped[list[float]] = mapped_column(JSON, nullable=False, default=list)
    key_slice: Mapped[int | None] = mapped_column(Integer)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, nullable=False, default=dict)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    flag: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    details: Mapped[dict[str, object]] = mapped_column(JSON, nullable=False, default=dict)
    superseded: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = _ts()


class Delivery(Base):
    """One result object to one destination, retried with backoff until delivered or dead."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), nullable=False, index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), nullable=False, index=True)
    destination: Mapped[str] = mapped_column(String(64), nullable=False)
    object_kind: Mapped[str] = mapped_column(String(8), nullable=False)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = _ts_null()
    # the sending process (host:pid:tag) while a claim is out; see deliveries.claim_due
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = _ts_null()
    created_at: Mapped[datetime] = _ts()
