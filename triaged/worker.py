"""The job loop: claim a study, score it, write its result objects, queue their delivery.

A worker holds a lease on its job and renews it while it works; if it dies, the lease
expires and any worker (on any machine sharing the database) takes the job again. The
final transaction checks that the lease is still ours, so a worker that lost its lease
never records a second result. Result UIDs derive from the study and the job, so a job
scored twice still writes the same SOP Instance UIDs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from triaged.config import Settings
from triaged.dicom.identity import RecordedFile, first_mismatch
from triaged.worklist import deliveries, jobs
from triaged.worklist.models import Job, JobState, Result, Study, StudyState, utcnow
from triaged.worklist.result_details import ResultDetails
from triaged.worklist.studies import set_state, study_file_identities

log = logging.getLogger("triaged.worker")

MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Skipped:
    """The study cannot be scored (no eligible series, no live model, ...): say why."""

    reason: str


@dataclass(frozen=True)
class ResultFile:
    kind: str  # SR, SC, SEG
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class Scored:
    """What the worker records for a scored study (see ``Result`` in the database)."""

    pipeline: str
    series_instance_uid: str
    fusion_probability: float
    cbam_probability: float | None
    models: dict[str, str]
    slice_probabilities: list[float]
    key_slice: int
    timings: dict[str, float]
    priority: int
    flag: bool
    files: list[ResultFile]
    details: ResultDetails
    reason: str | None = None  # a caveat kept as the SCORED state's reason (out of distribution)


class StudyProcessor(Protocol):
    """Score one study's files and write its result objects into ``out_dir``."""

    def __call__(
        self, paths: Sequence[Path], out_dir: Path, result_key: str
    ) -> Scored | Skipped: ...


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """One job at a time; ``run_forever`` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        process: StudyProcessor,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.process = process
        self.name = name or owner_name()
        self.stop = threading.Event()
        self.results_dir = settings.storage.results_dir

    # -- lease keeping ------------------------------------------------------------------
    def _keep_lease(self, job_id: int, done: threading.Event, lost: threading.Event) -> None:
        period = max(0.5, self.settings.worker.lease_seconds / 3)
        while not done.wait(period):
            if not jobs.renew(self.engine, job_id, self.name, self.settings.worker.lease_seconds):
                lost.set()
                return

    # -- one job ------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and process one job; False when the queue is empty."""
        job = jobs.claim(self.engine, self.name, self.settings.worker.lease_seconds)
        if job is None:
            return False
        try:
            with Session(self.engine) as s, s.begin():
                study = s.get(Study, job.study_id)
                if study is None:
                    raise LookupError(f"study {job.study_id} vanished")
                set_state(s, study, StudyState.SCORING, None)
                files = [
                    RecordedFile(Path(path), study_uid, series_uid, sop_uid, patient_id)
                    for path, study_uid, series_uid, sop_uid, patient_id in study_file_identities(
                        s, job.study_instance_uid
                    )
                ]
        except Exception:
            log.exception("cannot start job %d; it goes back to the queue", job.id)
            jobs.release(self.engine, job.id, self.name)
            return False
        done, lost = threading.Event(), threading.Event()
        keeper = threading.Thread(
            target=self._keep_lease, args=(job.id, done, lost), daemon=True, name="lease"
        )
        keeper.start()
        t0 = time.perf_counter()
        try:
            mismatch = first_mismatch(files)
            if mismatch is not None:
                done.set()
                self._refuse(job, mismatch)
                return True
            out_dir = self.results_dir / job.study_instance_uid / f"job{job.id}"
            outcome = self.process([f.path for f in files], out_dir, f"job{job.id}")
        except Exception as err:
            done.set()
            log.exception("scoring study %s failed", job.study_instance_uid)
            self._fail(job, f"{type(err).__name__}: {err}"[:500])
            return True
        finally:
            done.set()
            keeper.join()
        if lost.is_set():
            log.warning("lease on job %d lost; abandoning its result", job.id)
            return True
        total = time.perf_counter() - t0
        self._record(job, outcome, total)
        return True

    def _refuse(self, job: jobs.ClaimedJob, mismatch: str) -> None:
        """A file is not the instance it was recorded as: never score; the study FAILS.

        Not retried: the files will not change by themselves; an operator must look.
        """
        reason = f"identity check failed: {mismatch}"[:500]
        log.error("study %s not scored: %s", job.study_instance_uid, reason)
        with Session(self.engine) as s, s.begin():
            if not jobs.still_owned(s, job.id, self.name):
                return
            study = s.get(Study, job.study_id)
            assert study is not None
            jobs.finish(s, job.id, JobState.FAILED, reason)
            set_state(s, study, StudyState.FAILED, reason)

    def _fail(self, job: jobs.ClaimedJob, reason: str) -> None:
        with Session(self.engine) as s, s.begin():
            if not jobs.still_owned(s, job.id, self.name):
                return
            study = s.get(Study, job.study_id)
            assert study is not None
            if job.attempts < MAX_ATTEMPTS:
                s.execute(
                    update(Job)
                    .where(Job.id == job.id)
                    .values(
                        state=JobState.QUEUED,
                        lease_owner=None,
                        lease_expires_at=None,
                        error=reason,
                    )
                )
                set_state(s, study, StudyState.QUEUED, f"retrying after error: {reason}")
            else:
                jobs.finish(s, job.id, JobState.FAILED, reason)
                set_state(s, study, StudyState.FAILED, f"scoring failed: {reason}")

    def _record(self, job: jobs.ClaimedJob, outcome: Scored | Skipped, total: float) -> None:
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            if not jobs.still_owned(s, job.id, self.name):
                log.warning("job %d is no longer ours; result dropped", job.id)
                return
            study = s.get(Study, job.study_id)
            assert study is not None
            if study.state != StudyState.SCORING:
                # reopened by new instances meanwhile: a newer job will score it again
                jobs.finish(s, job.id, JobState.CANCELLED, "study changed while scoring")
                return
            if isinstance(outcome, Skipped):
                jobs.finish(s, job.id, JobState.DONE, None)
                set_state(s, study, StudyState.SKIPPED, outcome.reason, now)
                return
            s.execute(update(Result).where(Result.study_id == study.id).values(superseded=True))
            result = Result(
                study_id=study.id,
                job_id=job.id,
                pipeline=outcome.pipeline,
                series_instance_uid=outcome.series_instance_uid,
                fusion_probability=outcome.fusion_probability,
                cbam_probability=outcome.cbam_probability,
                models=outcome.models,
                slice_probabilities=outcome.slice_probabilities,
                key_slice=outcome.key_slice,
                timings={**outcome.timings, "total": total},
                priority=outcome.priority,
                flag=outcome.flag,
                details=outcome.details.to_json(),
                superseded=False,
                created_at=now,
            )
            s.add(result)
            s.flush()
            study.priority = outcome.priority
            study.flag = outcome.flag
            study.scored_at = now
            jobs.finish(s, job.id, JobState.DONE, None)
            set_state(s, study, StudyState.SCORED, outcome.reason, now)
            names = [d.name for d in self.settings.destinations]
            if names and outcome.files:
                deliveries.queue(
                    s,
                    study.id,
                    result.id,
                    [
                        deliveries.QueuedObject(f.kind, f.sop_instance_uid, str(f.path))
                        for f in outcome.files
                    ],
                    names,
                    now,
                )
        log.info(
            "study %s scored: fusion %.3f, priority %d%s in %.1f s",
            job.study_instance_uid,
            outcome.fusion_probability,
            outcome.priority,
            " FLAGGED" if outcome.flag else "",
            total,
        )

    def run_forever(self, idle_seconds: float | None = None) -> None:
        idle = idle_seconds or self.settings.worker.poll_seconds
        while not self.stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                log.exception("worker loop error")
                busy = False
            if not busy:
                self.stop.wait(idle)


def release_dead_local_leases(engine: Engine, is_alive: Callable[[int], bool]) -> int:
    """At start-up: jobs leased by a dead process of this host are queued again at once.

    Other hosts' leases are left to expire (their processes may be alive).
    """
    host = socket.gethostname()
    released = 0
    with Session(engine) as s, s.begin():
        running = s.scalars(
            select(Job).where(Job.state == JobState.RUNNING, Job.lease_owner.like(f"{host}:%"))
        ).all()
        for job in running:
            try:
                pid = int(str(job.lease_owner).split(":")[1])
            except (IndexError, ValueError):
                continue
            if pid == os.getpid() or is_alive(pid):
                continue
            job.state = JobState.QUEUED
            job.lease_owner = None
            job.lease_expires_at = None
            study = s.get(Study, job.study_id)
            if study is not None and study.state == StudyState.SCORING:
                set_state(s, study, StudyState.QUEUED, "worker died; queued again")
            released += 1
    return released
