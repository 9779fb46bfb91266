"""Deliveries of result objects: queueing, leased claims, backoff and the dead letter.

A delivery is one object to one destination. Claims work like job leases: a claimed
delivery's ``next_attempt_at`` moves past the lease and ``lease_owner`` names the sender,
so a sender that dies lets it come due again (at once when a new process on the same host
finds the sender's pid gone, see ``release_dead_local_claims``), and a resend carries the
same SOP Instance UID (no duplicate in the PACS).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from triaged.worklist.models import (
    Delivery,
    DeliveryState,
    Result,
    Study,
    StudyState,
    utcnow,
)
from triaged.worklist.studies import set_state


@dataclass(frozen=True)
class QueuedObject:
    kind: str  # "SR", "SC", "SEG"
    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class DueDelivery:
    id: int
    study_id: int
    destination: str
    path: str
    attempts: int


def queue(
    session: Session,
    study_id: int,
    result_id: int,
    objects: Sequence[QueuedObject],
    destinations: Sequence[str],
    now: datetime | None = None,
) -> int:
    """Queue every object for every destination; older undelivered ones are superseded."""
    now = now or utcnow()
    session.execute(
        update(Delivery)
        .where(
            Delivery.study_id == study_id,
            Delivery.state.in_([DeliveryState.PENDING, DeliveryState.DEAD]),
        )
        .values(state=DeliveryState.SUPERSEDED, last_error="superseded by a newer result")
    )
    n = 0
    for dest in destinations:
        for obj in objects:
            session.add(
                Delivery(
                    study_id=study_id,
                    result_id=result_id,
                    destination=dest,
                    object_kind=obj.kind,
                    sop_instance_uid=obj.sop_instance_uid,
                    path=obj.path,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
            )
            n += 1
    return n


def claim_due(
    engine: Engine,
    lease_seconds: float,
    owner: str | None = None,
    limit: int = 50,
    now: datetime | None = None,
) -> list[DueDelivery]:
    """Take the deliveries that are due, leasing them to ``owner`` (host:pid:tag)."""
    now = now or utcnow()
    bind = engine
    if engine.dialect.name == "sqlite":
        bind = engine.execution_options(sqlite_begin="IMMEDIATE")
    with Session(bind) as s, s.begin():
        rows = s.scalars(
            select(Delivery)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        out = []
        for d in rows:
            d.next_attempt_at = now + timedelta(seconds=lease_seconds)
            d.lease_owner = owner
            out.append(DueDelivery(d.id, d.study_id, d.destination, d.path, d.attempts))
        return out


def record_outcome(
    session: Session,
    delivery_id: int,
    *,
    delivered: bool,
    permanent: bool,
    detail: str,
    max_attempts: int,
    backoff_seconds: float,
    backoff_max_seconds: float,
    now: datetime | None = None,
) -> str:
    """Apply one send's outcome; returns the delivery's new state."""
    now = now or utcnow()
    d = session.get(Delivery, delivery_id)
    if d is None or d.state != DeliveryState.PENDING:
        return d.state if d else DeliveryState.SUPERSEDED
    d.attempts += 1
    d.lease_owner = None
    d.last_error = None if delivered else detail[:500]
    if delivered:
        d.state = DeliveryState.DELIVERED
        d.delivered_at = now
        d.next_attempt_at = None
    elif permanent or d.attempts >= max_attempts:
        d.state = DeliveryState.DEAD
        d.next_attempt_at = None
        if not permanent:
            d.last_error = f"gave up after {d.attempts} attempts: {detail}"[:500]
    else:
        delay = min(backoff_seconds * 2 ** (d.attempts - 1), backoff_max_seconds)
        d.next_attempt_at = now + timedelta(seconds=delay)
    return d.state


def release_dead_local_claims(
    engine: Engine, is_alive: Callable[[int], bool], now: datetime | None = None
) -> int:
    """At start-up: deliveries claimed by a dead process of this host are due again at once.

    Without this they would wait out the claim's lease after a crash. Other hosts'
    claims are left to expire (their processes may be alive).
    """
    now = now or utcnow()
    host = socket.gethostname()
    released = 0
    with Session(engine) as s, s.begin():
        claimed = s.scalars(
            select(Delivery).where(
                Delivery.state == DeliveryState.PENDING, Delivery.lease_owner.is_not(None)
            )
        ).all()
        for d in claimed:
            owner_host, _, rest = str(d.lease_owner).partition(":")
            pid_text = rest.split(":", 1)[0]
            if owner_host != host or not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == os.getpid() or is_alive(pid):
                continue
            d.lease_owner = None
            d.next_attempt_at = now
            released += 1
    return released


def settle_study(session: Session, study_id: int, now: datetime | None = None) -> None:
    """Move a SCORED study to DELIVERED or FAILED once none of its deliveries is pending."""
    now = now or utcnow()
    study = session.get(Study, study_id)
    if study is None or study.state not in (StudyState.SCORED, StudyState.FAILED):
        return
    states = session.execute(
        select(
            Delivery.destination, Delivery.object_kind, Delivery.state, Delivery.last_error
        ).where(Delivery.study_id == study_id, Delivery.state != DeliveryState.SUPERSEDED)
    ).all()
    if not states or any(s == DeliveryState.PENDING for _, _, s, _ in states):
        return
    dead = [(dest, kind, err) for dest, kind, s, err in states if s == DeliveryState.DEAD]
    if dead:
        dest, kind, err = dead[0]
        set_state(
            session, study, StudyState.FAILED, f"delivery of {kind} to {dest} failed: {err}", now
        )
    else:
        study.delivered_at = now
        set_state(session, study, StudyState.DELIVERED, None, now)


@dataclass(frozen=True)
class DestinationCounts:
    pending: int = 0
    dead: int = 0


def counts_by_destination(session: Session) -> dict[str, DestinationCounts]:
    """Pending and dead-lettered objects per destination (the admin page shows them)."""
    rows = session.execute(
        select(Delivery.destination, Delivery.state, func.count())
        .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.DEAD]))
        .group_by(Delivery.destination, Delivery.state)
    ).all()
    out: dict[str, dict[str, int]] = {}
    for dest, state, n in rows:
        out.setdefault(dest, {})[state] = int(n)
    return {
        d: DestinationCounts(c.get(DeliveryState.PENDING, 0), c.get(DeliveryState.DEAD, 0))
        for d, c in out.items()
    }


def requeue_dead(
    session: Session,
    *,
    destination: str | None = None,
    study_uid: str | None = None,
    now: datetime | None = None,
) -> int:
    """Give dead-lettered deliveries a fresh budget, e.g. once a PACS outage is fixed.

    Only current results are resent (a superseded object is never dead, it is SUPERSEDED);
    the same SOP Instance UIDs go out again. A study that FAILED because of these
    deliveries goes back to SCORED, and the delivery sweep settles it as usual.
    """
    now = now or utcnow()
    query = (
        select(Delivery)
        .join(Result, Result.id == Delivery.result_id)
        .where(Delivery.state == DeliveryState.DEAD, Result.superseded.is_(False))
    )
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    if study_uid is not None:
        query = query.join(Study, Study.id == Delivery.study_id).where(
            Study.study_instance_uid == study_uid
        )
    dead = session.scalars(query.with_for_update()).all()
    studies: set[int] = set()
    for d in dead:
        d.state = DeliveryState.PENDING
        d.attempts = 0
        d.next_attempt_at = now
        d.last_error = f"requeued after: {d.last_error or 'dead letter'}"[:500]
        studies.add(d.study_id)
    for study_id in studies:
        study = session.get(Study, study_id)
        if study is not None and study.state == StudyState.FAILED:
            set_state(session, study, StudyState.SCORED, "deliveries requeued", now)
    return len(dead)
