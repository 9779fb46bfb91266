"""Studies, series and instances: recording arrivals, state changes and completion.

Functions take a Session and plain values, so they are the same on SQLite and
PostgreSQL and testable without a network. Every state change goes through
``set_state`` so that it is logged and recorded as a study event.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from triaged.worklist.models import (
    Association,
    AssociationState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    StudyEvent,
    StudyState,
    utcnow,
)
from triaged.worklist.result_details import ResultDetails

log = logging.getLogger("triaged.worklist")


@dataclass(frozen=True)
class InstanceMeta:
    """What the SCP learns from an instance's header; no pixel data, no patient name."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    requested_priority: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None


class IdentityConflict(Exception):
    """An instance contradicts what is stored: another study, series or patient.

    The message names the conflict with UIDs only (never patient data); it goes to the
    log and to the C-STORE failure status. Nothing is recorded.
    """


def _insert(session: Session):  # type: ignore[no-untyped-def]
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def set_state(
    session: Session,
    study: Study,
    state: StudyState,
    reason: str | None = None,
    now: datetime | None = None,
) -> None:
    """Change a study's state, record the event and log it (one line, no patient data)."""
    now = now or utcnow()
    if study.state == state and study.state_reason == reason:
        return
    study.state = state
    study.state_reason = reason
    study.updated_at = now
    session.add(StudyEvent(study_id=study.id, state=state, reason=reason, at=now))
    log.info("study %s -> %s%s", study.study_instance_uid, state, f" ({reason})" if reason else "")


def _upsert_study(session: Session, meta: InstanceMeta, now: datetime) -> Study:
    ins = _insert(session)(Study).values(
        study_instance_uid=meta.study_instance_uid,
        patient_id=meta.patient_id,
        accession_number=meta.accession_number,
        study_date=meta.study_date,
        study_description=meta.study_description,
        requested_priority=meta.requested_priority,
        state=StudyState.RECEIVING,
        priority=0,
        flag=False,
        first_received_at=now,
        last_received_at=now,
        updated_at=now,
    )
    created = session.execute(
        ins.on_conflict_do_nothing(index_elements=["study_instance_uid"]).returning(Study.id)
    ).first()
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == meta.study_instance_uid)
    ).one()
    if created is not None:
        session.add(StudyEvent(study_id=study.id, state=StudyState.RECEIVING, at=now))
        log.info("study %s -> RECEIVING", study.study_instance_uid)
    return study


def _upsert_series(session: Session, study: Study, meta: InstanceMeta, now: datetime) -> Series:
    ins = _insert(session)(Series).values(
        study_id=study.id,
        series_instance_uid=meta.series_instance_uid,
        modality=meta.modality,
        series_number=meta.series_number,
        series_description=meta.series_description,
        created_at=now,
    )
    session.execute(ins.on_conflict_do_nothing(index_elements=["series_instance_uid"]))
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == meta.series_instance_uid)
    ).one()
    if series.study_id != study.id:
        raise IdentityConflict("Series Instance UID already stored under another study")
    return series


def _check_patient(study: Study, meta: InstanceMeta) -> None:
    """One study, one patient: an instance naming another Patient ID is refused."""
    if study.patient_id != meta.patient_id:
        raise IdentityConflict("Patient ID differs from the stored study's")


class IdCache:
    """Study and series row ids by UID, so that the SCP's hot path skips the upserts.

    Only a hint: the fast path re-checks the study's state in the same statement and
    falls back to the full upsert when the study is no longer RECEIVING. An entry holds
    the study's Patient ID too; an instance naming another one takes the full path,
    which refuses it.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._ids: dict[tuple[str, str], tuple[int, int, str | None]] = {}

    def get(self, meta: InstanceMeta) -> tuple[int, int] | None:
        hit = self._ids.get((meta.study_instance_uid, meta.series_instance_uid))
        if hit is None or hit[2] != meta.patient_id:
            return None
        return hit[0], hit[1]

    def put(self, meta: InstanceMeta, study_id: int, series_id: int) -> None:
        if len(self._ids) >= self.max_entries:
            self._ids.clear()
        key = (meta.study_instance_uid, meta.series_instance_uid)
        self._ids[key] = (study_id, series_id, meta.patient_id)


_INSTANCE_INSERTS: dict[str, Any] = {}


def _instance_insert(session: Session) -> Any:
    """INSERT .. ON CONFLICT DO NOTHING RETURNING id, built once per dialect.

    Built with bound parameters rather than ``.values(...)`` literals, so the SCP's hot
    path reuses one compiled statement instead of building and hashing a new one per
    instance.
    """
    name = session.get_bind().dialect.name
    stmt = _INSTANCE_INSERTS.get(name)
    if stmt is None:
        table = Instance.__table__
        stmt = (
            _insert(session)(table)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(table.c.id)
        )
        _INSTANCE_INSERTS[name] = stmt
    return stmt


#: Finished without a result: an exact resend retries them.
RETRIED_BY_RESEND = (StudyState.FAILED, StudyState.SKIPPED)


class Stored(enum.Enum):
    """What recording an instance did."""

    NEW = "new"
    DUPLICATE = "duplicate"  # the same instance again, same study, series and file
    RESTORED = "restored"  # the same instance, whose file had gone missing


_STUDIES = cast(Table, Study.__table__)
_TOUCH_RECEIVING = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("study_id"), _STUDIES.c.state == StudyState.RECEIVING)
    .values(last_received_at=bindparam("now"), updated_at=bindparam("now"))
)


def _insert_instance(
    session: Session,
    meta: InstanceMeta,
    study_id: int,
    series_id: int,
    path: str,
    size_bytes: int,
    association_id: int | None,
    now: datetime,
) -> Stored:
    """Insert the instance's row; a known SOP Instance UID must be where it was before."""
    row = {
        "study_id": study_id,
        "series_id": series_id,
        "association_id": association_id,
        "sop_instance_uid": meta.sop_instance_uid,
        "sop_class_uid": meta.sop_class_uid,
        "transfer_syntax_uid": meta.transfer_syntax_uid,
        "instance_number": meta.instance_number,
        "path": path,
        "size_bytes": size_bytes,
        "received_at": now,
        "file_missing": False,
    }
    # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
    known = None
    for _ in range(2):  # a row that vanished between the two statements: insert again
        if session.connection().execute(_instance_insert(session), row).first() is not None:
            return Stored.NEW
        known = session.execute(
            select(Instance.study_id, Instance.series_id, Instance.file_missing).where(
                Instance.sop_instance_uid == meta.sop_instance_uid
            )
        ).one_or_none()
        if known is not None:
            break
    if known is None:
        raise IdentityConflict("SOP Instance UID changing under concurrent stores")
    if known.study_id != study_id:
        raise IdentityConflict("SOP Instance already stored under another study")
    if known.series_id != series_id:
        raise IdentityConflict("SOP Instance already stored under another series")
    # The same instance again: a resend confirms an instance whose first association
    # aborted, and brings back a file the operator removed.
    session.execute(
        update(Instance)
        .where(Instance.sop_instance_uid == meta.sop_instance_uid)
        .values(association_id=association_id, file_missing=False, path=path)
    )
    return Stored.RESTORED if known.file_missing else Stored.DUPLICATE


def record_instance(
    session: Session,
    meta: InstanceMeta,
    path: str,
    size_bytes: int,
    association_id: int | None,
    now: datetime | None = None,
    cache: IdCache | None = None,
) -> bool:
    """Record a spooled instance; returns False when the SOP Instance UID was known already.

    An instance, its study, its series and its file always agree: an instance that
    contradicts what is stored (its SOP Instance UID under another study or series, its
    series under another study, another Patient ID than its study's) raises
    :class:`IdentityConflict` and the caller's transaction must be rolled back.

    A known instance is re-attributed to the current association (a resend confirms an
    instance whose first association aborted). Only new content (a new instance, or the
    file of one marked missing) reopens a study past RECEIVING: its pending scoring job
    is cancelled and it will be completed again. An exact resend changes nothing else,
    except for a FAILED or SKIPPED study, which it reopens: resending is how an operator
    retries one, and nothing of it was delivered.
    """
    now = now or utcnow()
    ids = cache.get(meta) if cache is not None else None
    if ids is not None:
        res = session.connection().execute(_TOUCH_RECEIVING, {"study_id": ids[0], "now": now})
        touched = cast("CursorResult[Any]", res).rowcount
        if touched:
            stored = _insert_instance(
                session, meta, ids[0], ids[1], path, size_bytes, association_id, now
            )
            return stored is Stored.NEW
    study = _upsert_study(session, meta, now)
    _check_patient(study, meta)
    series = _upsert_series(session, study, meta, now)
    stored = _insert_instance(
        session, meta, study.id, series.id, path, size_bytes, association_id, now
    )
    if cache is not None:
        cache.put(meta, study.id, series.id)
    if stored is Stored.DUPLICATE:
        if study.state in RETRIED_BY_RESEND:
            reopen(session, study, now, "resent")
        return False
    if study.state == StudyState.RECEIVING:
        study.last_received_at = now
        study.updated_at = now
    else:
        reopen(session, study, now)
    return stored is Stored.NEW


def forget_instance(session: Session, sop_instance_uid: str) -> None:
    """Remove the row of an instance whose file could not be placed (never acknowledged)."""
    session.execute(delete(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def reopen(
    session: Session, study: Study, now: datetime, why: str = "new instances arrived"
) -> None:
    """New data for a study already completed: cancel its queued job and receive again."""
    session.execute(
        update(Job)
        .where(Job.study_id == study.id, Job.state == JobState.QUEUED)
        .values(state=JobState.CANCELLED, finished_at=now, error="study reopened")
    )
    study.completed_at = None
    study.last_received_at = now
    set_state(session, study, StudyState.RECEIVING, why, now)


def open_association(session: Session, calling_ae: str, peer: str) -> int:
    a = Association(
        calling_ae=calling_ae[:16],
        peer=peer[:64],
        state=AssociationState.OPEN,
        started_at=utcnow(),
        instances_stored=0,
        failures=0,
    )
    session.add(a)
    session.flush()
    return a.id


def close_association(
    session: Session, association_id: int, state: AssociationState, stored: int, failures: int
) -> None:
    session.execute(
        update(Association)
        .where(Association.id == association_id)
        .values(state=state, ended_at=utcnow(), instances_stored=stored, failures=failures)
    )


def abort_open_associations(session: Session) -> int:
    """At start-up every association still OPEN died with the previous process."""
    res = session.execute(
        update(Association)
        .where(Association.state == AssociationState.OPEN)
        .values(state=AssociationState.ABORTED, ended_at=utcnow())
    )
    return int(cast("CursorResult[Any]", res).rowcount or 0)


def complete_due_studies(
    session: Session, quiet_seconds: float, max_wait_seconds: float, now: datetime | None = None
) -> list[str]:
    """Complete every RECEIVING study that has been quiet long enough; queue its scoring job.

    A study with instances from an association that is still open, or that aborted and was
    not resent, waits: the sender is expected to finish or resend. ``max_wait_seconds``
    after the first instance the study completes regardless.
    """
    now = now or utcnow()
    quiet_before = now - timedelta(seconds=quiet_seconds)
    max_before = now - timedelta(seconds=max_wait_seconds)
    unconfirmed = exists().where(
        Instance.study_id == Study.id,
        Instance.association_id == Association.id,
        Association.state != AssociationState.RELEASED,
    )
    due = session.scalars(
        select(Study)
        .where(
            Study.state == StudyState.RECEIVING,
            or_(
                Study.first_received_at <= max_before,
                and_(Study.last_received_at <= quiet_before, ~unconfirmed),
            ),
        )
        .order_by(Study.first_received_at)
        .with_for_update(skip_locked=True)
    ).all()
    done: list[str] = []
    for study in due:
        study.completed_at = now
        why = "quiet period elapsed"
        if study.first_received_at <= max_before and study.last_received_at > quiet_before:
            why = "maximum wait elapsed"
        set_state(session, study, StudyState.COMPLETE, why, now)
        session.add(Job(study_id=study.id, kind="score", state=JobState.QUEUED, created_at=now))
        set_state(session, study, StudyState.QUEUED, None, now)
        done.append(study.study_instance_uid)
    return done


@dataclass(frozen=True)
class StudyRow:
    """One worklist line; the JSON keys of ``triaged worklist --json``."""

    study_instance_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None
    modalities: list[str]
    num_series: int
    num_instances: int
    state: str
    state_reason: str | None
    priority: int
    flag: bool
    received_at: str
    completed_at: str | None
    ood_reason: str | None = None  # the current result's out-of-distribution reason


def _ood_reasons(session: Session, ids: list[int]) -> dict[int, str]:
    """Study id -> the out-of-distribution reason of its current (not superseded) result."""
    if not ids:
        return {}
    q = (
        select(Result.study_id, Result.details)
        .where(Result.study_id.in_(ids), Result.superseded.is_(False))
        .order_by(Result.id)
    )
    out: dict[int, str] = {}
    for sid, details in session.execute(q):
        reason = ResultDetails.load(details).summary.ood_reason
        if reason:
            out[sid] = reason
        else:
            out.pop(sid, None)
    return out


def reading_order(
    where: Iterable[ColumnElement[bool]] = (), limit: int | None = None
) -> Select[Study]:
    """The worklist query: triage priority first, then the longest waiting.

    The order is the product, so the web page, the API and ``triaged worklist`` all list
    studies through this one query (``where``: their filters).
    """
    q = (
        select(Study)
        .where(*where)
        .order_by(Study.priority.desc(), Study.first_received_at.asc(), Study.id.asc())
    )
    return q.limit(limit) if limit else q


def list_studies(session: Session, limit: int | None = None) -> list[StudyRow]:
    """Studies in reading order (``reading_order``), with their series and file counts."""
    studies = list(session.scalars(reading_order(limit=limit)))
    ids = [s.id for s in studies]
    series: dict[int, list[Series]] = {i: [] for i in ids}
    counts: dict[int, int] = {}
    if ids:
        for se in session.scalars(select(Series).where(Series.study_id.in_(ids))):
            series[se.study_id].append(se)
        n_inst = (
            select(Instance.study_id, func.count())
            .where(Instance.study_id.in_(ids), Instance.file_missing.is_(False))
            .group_by(Instance.study_id)
        )
        counts = {sid: int(n) for sid, n in session.execute(n_inst)}
    rows = [(st, counts.get(st.id, 0)) for st in studies]
    ood = _ood_reasons(session, ids)
    out: list[StudyRow] = []
    for study, n in rows:
        ss = series[study.id]
        out.append(
            StudyRow(
                study_instance_uid=study.study_instance_uid,
                patient_id=study.patient_id,
                accession_number=study.accession_number,
                study_date=study.study_date,
                modalities=sorted({s.modality for s in ss if s.modality}),
                num_series=len(ss),
                num_instances=int(n),
                state=study.state,
                state_reason=study.state_reason,
                priority=study.priority,
                flag=study.flag,
                received_at=study.first_received_at.isoformat(),
                completed_at=study.completed_at.isoformat() if study.completed_at else None,
                ood_reason=ood.get(study.id),
            )
        )
    return out


def study_files(session: Session, study_instance_uid: str) -> Sequence[Instance]:
    """Instances of a study whose file is present, for the scoring worker."""
    return session.scalars(
        select(Instance)
        .join(Study, Study.id == Instance.study_id)
        .where(Study.study_instance_uid == study_instance_uid, Instance.file_missing.is_(False))
        .order_by(Instance.series_id, Instance.instance_number, Instance.id)
    ).all()


def study_file_identities(
    session: Session, study_instance_uid: str
) -> list[tuple[str, str, str, str, str | None]]:
    """(path, study UID, series UID, SOP Instance UID, the study's Patient ID) of each file
    the worker will read, in :func:`study_files` order: what each file must say it is."""
    rows = session.execute(
        select(
            Instance.path,
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
            Study.patient_id,
        )
        .join(Study, Study.id == Instance.study_id)
        .join(Series, Series.id == Instance.series_id)
        .where(Study.study_instance_uid == study_instance_uid, Instance.file_missing.is_(False))
        .order_by(Instance.series_id, Instance.instance_number, Instance.id)
    ).all()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


FINISHED = (StudyState.DELIVERED, StudyState.SKIPPED, StudyState.FAILED, StudyState.SCORED)


def purge_expired(session: Session, days: int, now: datetime | None = None) -> list[str]:
    """Delete finished studies not touched for ``days`` days; returns their UIDs.

    Only the rows go here; the caller removes the files. Results and deliveries go too:
    the PACS has the delivered objects, which is where a study lives long-term. Studies a
    radiologist gave feedback on are kept: they are the labels of the next retraining.
    """
    from triaged.worklist.models import Delivery, Result
    from triaged.worklist.web_models import Feedback

    before = (now or utcnow()) - timedelta(days=days)
    has_feedback = exists().where(Feedback.study_id == Study.id)
    studies = session.scalars(
        select(Study).where(Study.state.in_(FINISHED), Study.updated_at < before, ~has_feedback)
    ).all()
    ids = [s.id for s in studies]
    if not ids:
        return []
    for model in (Delivery, Result, Instance, Job, StudyEvent, Series):
        session.execute(delete(model).where(model.study_id.in_(ids)))
    session.execute(delete(Study).where(Study.id.in_(ids)))
    return [s.study_instance_uid for s in studies]
