"""The worklist database on SQLite and PostgreSQL: arrivals, completion, reopening, the job
queue with leases, and restart reconciliation."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from triaged.dicom.reconcile import reconcile
from triaged.dicom.spool import Spool
from triaged.synthetic import generate_study
from triaged.worklist import deliveries, jobs
from triaged.worklist.models import (
    AssociationState,
    Delivery,
    Instance,
    Job,
    JobState,
    Result,
    Study,
    StudyEvent,
    utcnow,
)
from triaged.worklist.studies import (
    IdCache,
    InstanceMeta,
    close_association,
    complete_due_studies,
    list_studies,
    open_association,
    record_instance,
)


def meta(i: int, study: str = "1.2.3", series: str = "1.2.3.1") -> InstanceMeta:
    return InstanceMeta(
        study,
        series,
        f"{series}.{i}",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1",
        patient_id="P1",
        modality="CT",
    )


def test_completion_after_quiet_period_and_reopen(engine: sa.Engine) -> None:
    t0 = utcnow()
    cache = IdCache()
    with Session(engine) as s, s.begin():
        a = open_association(s, "PACS", "127.0.0.1:1")
        for i in range(3):
            assert record_instance(s, meta(i), f"/x/{i}", 10, a, now=t0, cache=cache)
        assert not record_instance(s, meta(0), "/x/0", 10, a, now=t0, cache=cache)
    with Session(engine) as s, s.begin():
        # association still open: the study waits although it is quiet
        assert complete_due_studies(s, 5, 600, now=t0 + timedelta(seconds=10)) == []
        close_association(s, a, AssociationState.RELEASED, 3, 0)
    with Session(engine) as s, s.begin():
        assert complete_due_studies(s, 5, 600, now=t0 + timedelta(seconds=4)) == []
        assert complete_due_studies(s, 5, 600, now=t0 + timedelta(seconds=6)) == ["1.2.3"]
    with Session(engine) as s:
        (row,) = list_studies(s)
        assert (row.state, row.num_instances, row.num_series) == ("QUEUED", 3, 1)
        assert s.scalar(sa.select(sa.func.count()).select_from(Job)) == 1
    # a late instance reopens the study and cancels the queued job
    with Session(engine) as s, s.begin():
        assert record_instance(
            s, meta(9), "/x/9", 10, None, now=t0 + timedelta(seconds=7), cache=cache
        )
    with Session(engine) as s:
        assert s.scalars(sa.select(Study.state)).one() == "RECEIVING"
        assert s.scalars(sa.select(Job.state)).one() == JobState.CANCELLED
        states = s.scalars(sa.select(StudyEvent.state).order_by(StudyEvent.id)).all()
        assert states == ["RECEIVING", "COMPLETE", "QUEUED", "RECEIVING"]


def test_aborted_association_waits_for_resend_or_max_wait(engine: sa.Engine) -> None:
    t0 = utcnow()
    with Session(engine) as s, s.begin():
        a = open_association(s, "PACS", "p")
        record_instance(s, meta(1, "9.9", "9.9.1"), "/y/1", 1, a, now=t0)
        close_association(s, a, AssociationState.ABORTED, 1, 0)
    with Session(engine) as s, s.begin():
        assert complete_due_studies(s, 5, 60, now=t0 + timedelta(seconds=30)) == []
    with Session(engine) as s, s.begin():
        b = open_association(s, "PACS", "p")
        record_instance(s, meta(1, "9.9", "9.9.1"), "/y/1", 1, b, now=t0 + timedelta(seconds=31))
        close_association(s, b, AssociationState.RELEASED, 1, 0)
    with Session(engine) as s, s.begin():
        assert complete_due_studies(s, 5, 600, now=t0 + timedelta(seconds=40)) == ["9.9"]
    with Session(engine) as s, s.begin():
        c = open_association(s, "PACS", "p")
        record_instance(s, meta(1, "8.8", "8.8.1"), "/z/1", 1, c, now=t0)
        close_association(s, c, AssociationState.ABORTED, 1, 0)
    with Session(engine) as s, s.begin():
        assert complete_due_studies(s, 5, 60, now=t0 + timedelta(seconds=61)) == ["8.8"]


def _queue(engine: sa.Engine, n: int) -> None:
    now = utcnow()
    with Session(engine) as s, s.begin():
        for i in range(n):
            record_instance(s, meta(0, f"5.{i}", f"5.{i}.1"), "/p", 1, None, now=now)
        complete_due_studies(s, 0.0001, 600, now=now + timedelta(seconds=1))


def test_claims_are_exclusive_and_leases_expire(engine: sa.Engine) -> None:
    _queue(engine, 6)
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := jobs.claim(engine, name, 60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 6
    assert jobs.claim(engine, "late", 60) is None
    # a job given back (its worker could not start it) is claimable again at once
    assert (
        jobs.release(engine, claimed[0], "w0")
        or jobs.release(engine, claimed[0], "w1")
        or jobs.release(engine, claimed[0], "w2")
        or jobs.release(engine, claimed[0], "w3")
    )
    again = jobs.claim(engine, "late", 60)
    assert again is not None and again.id == claimed[0]
    with Session(engine) as s, s.begin():
        jobs.finish(s, again.id, JobState.DONE)
    # a lease that is not renewed expires and the job can be taken by another worker
    later = utcnow() + timedelta(seconds=61)
    stolen = jobs.claim(engine, "rescuer", 60, now=later)
    assert stolen is not None and stolen.attempts == 2
    assert not jobs.renew(engine, stolen.id, "w0", 60)
    assert jobs.renew(engine, stolen.id, "rescuer", 60)
    with Session(engine) as s, s.begin():
        assert jobs.still_owned(s, stolen.id, "rescuer")
        jobs.finish(s, stolen.id, JobState.DONE)
    assert jobs.queue_depth(engine) == 0


def test_reconcile_indexes_files_and_marks_missing(engine: sa.Engine, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1)
    study = generate_study(tmp_path / "src", seed=11, slices=3, size=32)
    from triaged.dicom.header import read_meta

    placed = []
    for f in study.files:
        m = read_meta(f)
        path, new = spool.write(
            f.read_bytes(), m.study_instance_uid, m.series_instance_uid, m.sop_instance_uid
        )
        assert new
        placed.append((m, path))
    (spool.incoming / "leftover.dcm").write_bytes(b"partial")
    # a row whose file is gone (deleted by an operator after a released association)
    with Session(engine) as s, s.begin():
        a = open_association(s, "PACS", "p")
        record_instance(s, meta(1, "7.7", "7.7.1"), str(tmp_path / "gone.dcm"), 1, a)
        close_association(s, a, AssociationState.RELEASED, 1, 0)
        # and one from an association that died before acknowledging its instance
        b = open_association(s, "PACS", "p")
        record_instance(s, meta(2, "7.7", "7.7.1"), str(tmp_path / "never.dcm"), 1, b)
    report = reconcile(spool, engine)
    assert report.files_indexed == len(study.files)
    assert report.temp_files_removed == 1
    assert report.associations_aborted == 1
    assert report.rows_missing_file == 1
    assert report.rows_never_acknowledged == 1
    with Session(engine) as s:
        rows = {i.sop_instance_uid: i for i in s.scalars(sa.select(Instance))}
    assert rows["7.7.1.1"].file_missing
    assert "7.7.1.2" not in rows
    assert all(m.sop_instance_uid in rows for m, _ in placed)
    assert reconcile(spool, engine).files_indexed == 0


def test_retention_removes_finished_studies_only(engine: sa.Engine, tmp_path: Path) -> None:
    from triaged.scheduler import retention_sweep
    from triaged.worklist.studies import set_state
    from triaged.worklist.web_models import Feedback

    old = utcnow() - timedelta(days=40)
    with Session(engine) as s, s.begin():
        for i, state in enumerate(["DELIVERED", "RECEIVING", "SKIPPED", "DELIVERED"]):
            record_instance(s, meta(0, f"6.{i}", f"6.{i}.1"), "/p", 1, None, now=old)
            study = s.scalars(sa.select(Study).where(Study.study_instance_uid == f"6.{i}")).one()
            set_state(s, study, state, None, now=old)
        kept = s.scalars(sa.select(Study).where(Study.study_instance_uid == "6.3")).one()
        s.add(
            Feedback(
                study_id=kept.id,
                user_name="rad",
                verdict="confirm",
                label="covid",
                note="",
                created_at=old,
            )
        )
    spool = Spool(tmp_path / "spool", 1)
    (spool.root / "6.0" / "6.0.1").mkdir(parents=True)
    assert retention_sweep(engine, spool, tmp_path / "results", 30) == 2
    with Session(engine) as s:
        left = sorted(s.scalars(sa.select(Study.study_instance_uid)).all())
        assert left == ["6.1", "6.3"]
        assert s.scalar(sa.select(sa.func.count()).select_from(Instance)) == 2
    assert not (spool.root / "6.0").exists()
    assert retention_sweep(engine, spool, tmp_path / "results", 30) == 0


def test_cron_schedule_parses() -> None:
    from triaged.scheduler import add_cron, make_scheduler

    sched = make_scheduler()
    add_cron(sched, "retrain", "0 2 * * 0", lambda: None)
    (job,) = sched.get_jobs()
    assert "day_of_week" in str(job.trigger)


def _scored_with_deliveries(s: Session, study: Study, kinds: list[str]) -> int:
    """A DONE job, a current result and its queued deliveries, as the worker leaves them."""
    now = utcnow()
    job = Job(
        study_id=study.id,
        kind="score",
        state=JobState.DONE,
        attempts=1,
        created_at=now,
        started_at=now,
        finished_at=now,
    )
    s.add(job)
    s.flush()
    s.execute(sa.update(Result).where(Result.study_id == study.id).values(superseded=True))
    r = Result(
        study_id=study.id,
        job_id=job.id,
        pipeline="covid-ct",
        series_instance_uid="1.2.3.1",
        fusion_probability=0.9,
        cbam_probability=0.8,
        models={},
        slice_probabilities=[0.9],
        key_slice=0,
        timings={},
        priority=90,
        flag=True,
        details={},
        superseded=False,
        created_at=now,
    )
    s.add(r)
    s.flush()
    objs = [deliveries.QueuedObject(k, f"9.9.{r.id}.{k}", f"/results/{k}.dcm") for k in kinds]
    deliveries.queue(s, study.id, r.id, objs, ["pacs"], now)
    study.state = "SCORED"
    return r.id


def test_dead_letters_requeue_and_supersede(engine: sa.Engine) -> None:
    with Session(engine) as s, s.begin():
        record_instance(s, meta(1), "/spool/1.dcm", 10, None)
        study = s.scalars(sa.select(Study)).one()
        _scored_with_deliveries(s, study, ["SR", "SEG"])
    for d in deliveries.claim_due(engine, 60):  # the PACS refuses: dead at once
        with Session(engine) as s, s.begin():
            deliveries.record_outcome(
                s,
                d.id,
                delivered=False,
                permanent=True,
                detail="association rejected",
                max_attempts=8,
                backoff_seconds=1,
                backoff_max_seconds=10,
            )
            deliveries.settle_study(s, d.study_id)
    with Session(engine) as s, s.begin():
        study = s.scalars(sa.select(Study)).one()
        assert study.state == "FAILED" and "association rejected" in (study.state_reason or "")
        assert deliveries.counts_by_destination(s)["pacs"] == deliveries.DestinationCounts(0, 2)
        assert deliveries.requeue_dead(s, destination="elsewhere") == 0
        assert deliveries.requeue_dead(s, study_uid="1.2.3") == 2
    with Session(engine) as s, s.begin():
        study = s.scalars(sa.select(Study)).one()
        assert (study.state, study.state_reason) == ("SCORED", "deliveries requeued")
    due = deliveries.claim_due(engine, 60)
    assert sorted(d.attempts for d in due) == [0, 0]
    for d in due:  # dead again; then the study is rescored: the old letters are superseded
        with Session(engine) as s, s.begin():
            deliveries.record_outcome(
                s,
                d.id,
                delivered=False,
                permanent=True,
                detail="x",
                max_attempts=8,
                backoff_seconds=1,
                backoff_max_seconds=10,
            )
    with Session(engine) as s, s.begin():
        study = s.scalars(sa.select(Study)).one()
        _scored_with_deliveries(s, study, ["SR"])
        assert deliveries.requeue_dead(s) == 0  # nothing of an old result goes out again
        states = sorted(s.scalars(sa.select(Delivery.state)).all())
    assert states == ["PENDING", "SUPERSEDED", "SUPERSEDED"]
