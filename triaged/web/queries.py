"""Database reads and writes of the web front end, as plain functions over a Session.

Kept apart from the HTTP layer so that the worklist order, the feedback rules and the
label export can be tested (and used by the CLI) without a web server.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, select
from sqlalchemy.orm import Session

from triaged.atomic import write_atomic
from triaged.config import WebSettings
from triaged.web.schemas import (
    AuditOut,
    DeliveryOut,
    DeliverySummary,
    EventOut,
    FeedbackOut,
    LabelExportOut,
    LabelOut,
    ResultOut,
    SeriesOut,
    StudyDetail,
    StudyItem,
)
from triaged.worklist.models import (
    Delivery,
    DeliveryState,
    Instance,
    Result,
    Series,
    Study,
    StudyEvent,
    StudyState,
    utcnow,
)
from triaged.worklist.result_details import ResultDetails
from triaged.worklist.studies import reading_order
from triaged.worklist.web_models import AuditEntry, Feedback

DELIVERY_FAILED = "DELIVERY_FAILED"
STATE_FILTERS = [*(s.value for s in StudyState), DELIVERY_FAILED]
IMAGE_KINDS = ("heatmap", "infected")


class NotFound(LookupError):
    """No such study (or image)."""


class Conflict(ValueError):
    """The request does not fit the study's state (e.g. feedback before any result)."""


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist filters; the same names are the page's URL query parameters."""

    state: str | None = None
    min_priority: int | None = None
    flagged: bool | None = None
    date_from: str | None = None
    date_to: str | None = None
    limit: int = 500


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _dicom_date(d: str | None) -> str | None:
    if d and len(d) == 8 and d.isdigit():
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return d or None


def model_version(models: dict[str, str] | None) -> str | None:
    """``{"fusion": "fusion:v3", "cbam": "v1"}`` -> ``"cbam:v1, fusion:v3"``."""
    if not models:
        return None
    refs = {v if ":" in str(v) else f"{k}:{v}" for k, v in models.items()}
    return ", ".join(sorted(refs))


def current_results(session: Session, study_ids: Iterable[int]) -> dict[int, Result]:
    """The newest result of each study that has not been superseded."""
    ids = list(study_ids)
    if not ids:
        return {}
    newest = (
        select(func.max(Result.id))
        .where(Result.study_id.in_(ids), Result.superseded.is_(False))
        .group_by(Result.study_id)
    )
    return {r.study_id: r for r in session.scalars(select(Result).where(Result.id.in_(newest)))}


def _delivery_summaries(session: Session, ids: list[int]) -> dict[int, DeliverySummary]:
    counts: dict[int, dict[str, int]] = {i: {} for i in ids}
    errors: dict[int, str | None] = {}
    if ids:
        q = (
            select(Delivery.study_id, Delivery.state, func.count())
            .where(Delivery.study_id.in_(ids), Delivery.state != DeliveryState.SUPERSEDED)
            .group_by(Delivery.study_id, Delivery.state)
        )
        for sid, state, n in session.execute(q):
            counts[sid][state] = int(n)
        dead = (
            select(Delivery.study_id, Delivery.last_error)
            .where(Delivery.study_id.in_(ids), Delivery.state == DeliveryState.DEAD)
            .order_by(Delivery.id)
        )
        for sid, err in session.execute(dead):
            errors[sid] = err
    return {
        i: DeliverySummary(
            pending=c.get(DeliveryState.PENDING, 0),
            delivered=c.get(DeliveryState.DELIVERED, 0),
            dead=c.get(DeliveryState.DEAD, 0),
            last_error=errors.get(i),
        )
        for i, c in counts.items()
    }


def _latest_feedback(session: Session, ids: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    if ids:
        q = select(Feedback.study_id, Feedback.verdict).where(Feedback.study_id.in_(ids))
        for sid, verdict in session.execute(q.order_by(Feedback.id)):
            out[sid] = verdict
    return out


def _items(session: Session, studies: list[Study], now: datetime) -> list[StudyItem]:
    ids = [s.id for s in studies]
    results = current_results(session, ids)
    deliveries = _delivery_summaries(session, ids)
    feedback = _latest_feedback(session, ids)
    out: list[StudyItem] = []
    for st in studies:
        r = results.get(st.id)
        out.append(
            StudyItem(
                study_instance_uid=st.study_instance_uid,
                patient_id=st.patient_id,
                accession_number=st.accession_number,
                study_date=_dicom_date(st.study_date),
                study_description=st.study_description,
                state=st.state,
                state_reason=st.state_reason,
                priority=st.priority,
                requested_priority=st.requested_priority,
                flag=st.flag,
                ood_reason=ResultDetails.load(r.details).summary.ood_reason if r else None,
                fusion_probability=r.fusion_probability if r else None,
                cbam_probability=r.cbam_probability if r else None,
                model_version=model_version(r.models) if r else None,
                received_at=st.first_received_at.isoformat(),
                waiting_seconds=max(0.0, (now - st.first_received_at).total_seconds()),
                scored_at=_iso(st.scored_at),
                delivered_at=_iso(st.delivered_at),
                deliveries=deliveries[st.id],
                feedback=feedback.get(st.id),
            )
        )
    return out


def worklist(session: Session, f: WorklistFilter, now: datetime | None = None) -> list[StudyItem]:
    """Studies in reading order (``triaged.worklist.studies.reading_order``), filtered."""
    now = now or utcnow()
    where: list[ColumnElement[bool]] = []
    if f.state == DELIVERY_FAILED:
        dead = select(Delivery.study_id).where(Delivery.state == DeliveryState.DEAD)
        where.append(Study.id.in_(dead))
    elif f.state:
        where.append(Study.state == f.state)
    if f.min_priority is not None:
        where.append(Study.priority >= f.min_priority)
    if f.flagged is not None:
        where.append(Study.flag.is_(f.flagged))
    if f.date_from:
        where.append(Study.study_date >= f.date_from.replace("-", ""))
    if f.date_to:
        where.append(Study.study_date <= f.date_to.replace("-", ""))
    studies = list(session.scalars(reading_order(where, f.limit)))
    return _items(session, studies, now)


def get_study(session: Session, uid: str) -> Study:
    study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
    if study is None:
        raise NotFound(f"no study {uid}")
    return study


def study_revision(session: Session, uid: str) -> tuple[str, str]:
    """(state, digest): the digest changes whenever anything the study page shows changes.

    The study page polls this instead of the full detail, so an open page notices a new
    score, delivery or reading without re-reading (and re-auditing) patient data.
    """
    study = get_study(session, uid)
    sid = study.id

    def agg(model: Any) -> tuple[Any, ...]:
        return tuple(
            session.execute(
                select(func.count(), func.max(model.id)).where(model.study_id == sid)
            ).one()
        )

    deliveries = session.execute(
        select(Delivery.id, Delivery.state, Delivery.attempts, Delivery.next_attempt_at)
        .where(Delivery.study_id == sid)
        .order_by(Delivery.id)
    ).all()
    parts = (
        study.state,
        study.state_reason,
        _iso(study.updated_at),
        agg(Instance),
        agg(Result),
        agg(StudyEvent),
        agg(Feedback),
        [(i, st, n, _iso(t)) for i, st, n, t in deliveries],
    )
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    return str(study.state), digest


def image_path(result: Result, kind: str) -> Path | None:
    """The PNG the worker wrote for ``kind`` (``details["images"]``), if it is there."""
    if kind not in IMAGE_KINDS:
        return None
    p = ResultDetails.load(result.details).images.get(kind)
    if not p:
        return None
    path = Path(p)
    return path if path.suffix.lower() == ".png" and path.is_file() else None


def _result_out(result: Result, image_url: Callable[[str], str]) -> ResultOut:
    details = ResultDetails.load(result.details)
    scores = [float(p) for p in (result.slice_probabilities or [])]
    return ResultOut(
        pipeline=result.pipeline,
        series_instance_uid=result.series_instance_uid,
        fusion_probability=result.fusion_probability,
        cbam_probability=result.cbam_probability,
        threshold=details.threshold,
        flag=result.flag,
        priority=result.priority,
        ood=None if details.summary.ood is None else details.summary.ood.model_dump(mode="json"),
        models=dict(result.models or {}),
        slice_probabilities=scores,
        slice_indices=details.slice_indices,
        key_slice=result.key_slice,
        key_slice_position=details.plot_position(result.key_slice, len(scores)),
        timings={k: float(v) for k, v in (result.timings or {}).items()},
        sr_text=details.sr_text,
        images={k: (image_url(k) if image_path(result, k) else None) for k in IMAGE_KINDS},
        created_at=result.created_at.isoformat(),
        raw_probability=details.summary.raw_probability,
        operating_point=details.summary.operating_point,
        calibrated_on=details.summary.calibrated_on,
    )


def study_detail(
    session: Session, uid: str, image_url: Callable[[str], str], now: datetime | None = None
) -> StudyDetail:
    """Everything the study page shows; ``image_url(kind)`` makes the PNG links."""
    study = get_study(session, uid)
    item = _items(session, [study], now or utcnow())[0]
    n_inst = (
        select(Instance.series_id, func.count())
        .where(Instance.study_id == study.id, Instance.file_missing.is_(False))
        .group_by(Instance.series_id)
    )
    counts = {sid: int(n) for sid, n in session.execute(n_inst)}
    series = [
        SeriesOut(
            series_instance_uid=se.series_instance_uid,
            modality=se.modality,
            series_number=se.series_number,
            series_description=se.series_description,
            instances=counts.get(se.id, 0),
        )
        for se in session.scalars(
            select(Series).where(Series.study_id == study.id).order_by(Series.series_number)
        )
    ]
    result = current_results(session, [study.id]).get(study.id)
    deliveries = [
        DeliveryOut(
            destination=d.destination,
            object_kind=d.object_kind,
            sop_instance_uid=d.sop_instance_uid,
            state=d.state,
            attempts=d.attempts,
            last_error=d.last_error,
            next_attempt_at=_iso(d.next_attempt_at),
            delivered_at=_iso(d.delivered_at),
        )
        for d in session.scalars(
            select(Delivery)
            .where(Delivery.study_id == study.id, Delivery.state != DeliveryState.SUPERSEDED)
            .order_by(Delivery.destination, Delivery.object_kind, Delivery.id)
        )
    ]
    timeline = [
        EventOut(state=e.state, reason=e.reason, at=e.at.isoformat())
        for e in session.scalars(
            select(StudyEvent)
            .where(StudyEvent.study_id == study.id)
            .order_by(StudyEvent.at, StudyEvent.id)
        )
    ]
    return StudyDetail(
        study=item,
        series=series,
        result=_result_out(result, image_url) if result else None,
        deliveries=deliveries,
        timeline=timeline,
        feedback=list_feedback(session, study.id),
    )


def study_image(session: Session, uid: str, kind: str) -> Path:
    study = get_study(session, uid)
    result = current_results(session, [study.id]).get(study.id)
    path = image_path(result, kind) if result else None
    if path is None:
        raise NotFound(f"no {kind} image for study {uid}")
    return path


def _feedback_out(f: Feedback) -> FeedbackOut:
    return FeedbackOut(
        user=f.user_name,
        verdict=f.verdict,  # type: ignore[arg-type]
        label=f.label,  # type: ignore[arg-type]
        note=f.note,
        at=f.created_at.isoformat(),
    )


def list_feedback(session: Session, study_id: int) -> list[FeedbackOut]:
    rows = session.scalars(
        select(Feedback).where(Feedback.study_id == study_id).order_by(Feedback.id)
    )
    return [_feedback_out(f) for f in rows]


def label_for(flag: bool, verdict: str) -> str:
    """Confirming a positive finding or refuting a negative one means COVID-19."""
    return "covid" if flag == (verdict == "confirm") else "non-covid"


def add_feedback(
    session: Session, uid: str, user: str, verdict: str, note: str | None
) -> FeedbackOut:
    """Record a verdict on the study's current finding."""
    if verdict not in ("confirm", "refute"):
        raise Conflict("verdict is confirm or refute")
    study = get_study(session, uid)
    result = current_results(session, [study.id]).get(study.id)
    if result is None:
        raise Conflict("the study has no result to confirm or refute yet")
    fb = Feedback(
        study_id=study.id,
        result_id=result.id,
        user_name=user,
        verdict=verdict,
        label=label_for(result.flag, verdict),
        note=(note or "").strip() or None,
        created_at=utcnow(),
    )
    session.add(fb)
    session.flush()
    return _feedback_out(fb)


def _spool_paths(
    session: Session, study_id: int, series_uid: str | None, root: Path | None
) -> list[str]:
    """The folders holding the study's (scored series') files, relative to ``root``."""
    q = select(Instance.path).where(Instance.study_id == study_id, Instance.file_missing.is_(False))
    if series_uid:
        q = q.join(Series, Series.id == Instance.series_id).where(
            Series.series_instance_uid == series_uid
        )
    folders = sorted({str(Path(p).parent) for p in session.scalars(q)})
    if root is None:
        return folders
    out = []
    for folder in folders:
        try:
            out.append(str(Path(folder).relative_to(root)))
        except ValueError:
            out.append(folder)
    return out


def labels(session: Session, spool_root: Path | None = None) -> LabelExportOut:
    """All radiologist feedback as ``triaged-labels/1`` (oldest first: the last one wins).

    Studies whose files are gone (retention) are left out: retraining could not read them.
    """
    root = spool_root.resolve() if spool_root is not None else None
    rows = session.execute(
        select(Feedback, Study.study_instance_uid, Result)
        .join(Study, Study.id == Feedback.study_id)
        .outerjoin(Result, and_(Result.id == Feedback.result_id))
        .order_by(Feedback.created_at, Feedback.id)
    ).all()
    out: list[LabelOut] = []
    for fb, uid, result in rows:
        series_uid = result.series_instance_uid if result is not None else None
        paths = _spool_paths(session, fb.study_id, series_uid, root)
        if not paths:
            continue
        prob = None
        if result is not None:
            prob = (
                result.fusion_probability
                if result.fusion_probability is not None
                else result.cbam_probability
            )
        out.append(
            LabelOut(
                study_instance_uid=uid,
                label=fb.label,  # type: ignore[arg-type]
                spool_paths=paths,
                series_instance_uid=series_uid,
                labelled_by=fb.user_name,
                labelled_at=fb.created_at.isoformat(),
                model=model_version(result.models) if result is not None else None,
                probability=prob,
            )
        )
    return LabelExportOut(
        exported_at=utcnow().isoformat(),
        spool_root=str(root) if root is not None else None,
        labels=out,
    )


def export_labels(
    engine: Engine, path: str | os.PathLike[str], spool_root: Path | None = None
) -> int:
    """Write the ``triaged-labels/1`` export to ``path`` atomically; returns the label count.

    With ``spool_root`` the paths are relative to it (portable when the spool moves),
    without it they are absolute.
    """
    with Session(engine) as s:
        export = labels(s, spool_root)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Owner-only, as before: the export names studies and who labelled them.
    write_atomic(target, json.dumps(export.model_dump(mode="json"), indent=2), mode=0o600)
    return len(export.labels)


@dataclass(frozen=True)
class LoginThrottle:
    """What a login attempt must wait for: ``retry_after`` > 0 refuses it (429)."""

    retry_after: int
    account_delay: float


def _failures(session: Session, since: datetime, where: Any) -> tuple[int, datetime | None]:
    """Failed logins matching ``where`` since ``since``: how many, and the latest."""
    count, last = session.execute(
        select(func.count(), func.max(AuditEntry.at)).where(
            AuditEntry.action == "login_failed", AuditEntry.at >= since, where
        )
    ).one()
    return int(count or 0), last


def address_backoff(failures: int, web: WebSettings) -> float:
    """Seconds an address waits after its latest failure: doubling beyond the allowance."""
    extra = failures - web.login_failures_allowed
    if extra < 0:
        return 0.0
    return min(web.login_backoff_seconds * 2.0 ** min(extra, 60), web.login_backoff_max_seconds)


def account_delay(failures: int, web: WebSettings) -> float:
    """A short, capped slow-down for an account under attack; never a refusal, so a
    stranger's wrong passwords cannot lock the real user out."""
    extra = failures - web.login_failures_allowed
    if extra < 0:
        return 0.0
    return min(0.25 * 2.0 ** min(extra, 60), web.login_account_delay_max_seconds)


def login_throttle(
    engine: Engine, web: WebSettings, user: str, client: str | None, now: datetime | None = None
) -> LoginThrottle:
    """Throttle per client address (exponential backoff), slow down per account.

    Read from the audit log, so every process serving the page sees the same counts.
    """
    now = now or utcnow()
    since = now - timedelta(minutes=web.login_window_minutes)
    retry_after = 0
    with Session(engine) as s:
        if client:
            n, last = _failures(s, since, AuditEntry.client == client)
            if last is not None:
                wait = (last + timedelta(seconds=address_backoff(n, web)) - now).total_seconds()
                retry_after = max(0, math.ceil(wait))
        n_user, _ = _failures(s, since, AuditEntry.user_name == user) if user else (0, None)
    return LoginThrottle(retry_after, account_delay(n_user, web))


def audit(
    session: Session,
    user: str | None,
    action: str,
    target: str | None,
    client: str | None,
    detail: str | None = None,
) -> None:
    session.add(
        AuditEntry(
            at=utcnow(),
            user_name=user,
            action=action[:32],
            target=(target or None) and target[:200],
            client=(client or None) and client[:64],
            detail=detail,
        )
    )


def recent_audit(session: Session, limit: int = 100) -> list[AuditOut]:
    rows = session.scalars(
        select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
    )
    return [
        AuditOut(
            at=a.at.isoformat(),
            user=a.user_name,
            action=a.action,
            target=a.target,
            client=a.client,
            detail=a.detail,
        )
        for a in rows
    ]
