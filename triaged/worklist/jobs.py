"""The job queue: atomic claims with leases, on PostgreSQL and SQLite alike.

PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` so that many workers on many machines
never take the same job; SQLite serialises claims with ``BEGIN IMMEDIATE`` (one writer).
A claim is a lease: a worker that dies stops renewing it, and once it expires the job
is claimable again by anyone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from triaged.worklist.models import Job, JobState, Study, utcnow


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_id: int
    study_instance_uid: str
    kind: str
    attempts: int
    owner: str


def _session(engine: Engine) -> Session:
    if engine.dialect.name == "sqlite":
        return Session(engine.execution_options(sqlite_begin="IMMEDIATE"))
    return Session(engine)


def claim(
    engine: Engine,
    owner: str,
    lease_seconds: float,
    kind: str = "score",
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Take the oldest QUEUED job, or one whose lease expired; None when there is none."""
    now = now or utcnow()
    with _session(engine) as s, s.begin():
        job = s.scalars(
            select(Job)
            .where(
                Job.kind == kind,
                or_(
                    Job.state == JobState.QUEUED,
                    (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now),
                ),
            )
            .order_by(Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if job is None:
            return None
        job.state = JobState.RUNNING
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.attempts += 1
        job.started_at = now
        uid = s.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id))
        return ClaimedJob(job.id, job.study_id, str(uid), job.kind, job.attempts, owner)


def renew(engine: Engine, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend a lease; False means the lease was lost and the work must be abandoned."""
    now = utcnow()
    with _session(engine) as s, s.begin():
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        )
        return bool(cast("CursorResult[Any]", res).rowcount)


def release(engine: Engine, job_id: int, owner: str) -> bool:
    """Give a job back to the queue (the worker could not start it)."""
    with _session(engine) as s, s.begin():
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
            .values(state=JobState.QUEUED, lease_owner=None, lease_expires_at=None)
        )
        return bool(cast("CursorResult[Any]", res).rowcount)


def still_owned(session: Session, job_id: int, owner: str) -> bool:
    """Inside the worker's final transaction: is the job still ours (lock it on PostgreSQL)?"""
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
    return job is not None and job.lease_owner == owner and job.state == JobState.RUNNING


def finish(session: Session, job_id: int, state: JobState, error: str | None = None) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(state=state, finished_at=utcnow(), error=error, lease_expires_at=None)
    )


def queue_depth(engine: Engine) -> int:
    from sqlalchemy import func

    with Session(engine) as s:
        return int(s.scalar(select(func.count()).where(Job.state == JobState.QUEUED)) or 0)
