"""Patient safety on receive: an instance, its study, its series and its file always agree.

Real `triaged serve` daemons fed by dcmtk storescu over loopback, on SQLite and
PostgreSQL; the database and the spool are inspected afterwards (issue #10 findings 1, 2
and 8).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import sqlalchemy as sa
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session

from tests.conftest import Daemon, store_statuses, storescu
from triaged.config import from_dict
from triaged.dicom.header import read_meta, uid_problem
from triaged.dicom.spool import Spool
from triaged.synthetic import generate_study
from triaged.worker import Skipped, Worker
from triaged.worklist.models import Job, JobState, Study, StudyState
from triaged.worklist.studies import (
    IdentityConflict,
    InstanceMeta,
    complete_due_studies,
    record_instance,
    set_state,
)

OTHER_PATIENT = "OTHER-PATIENT-0815"


def rewrite(files: list[Path], out: Path, **attrs: str) -> list[Path]:
    """Copies of ``files`` with attributes replaced (the SOP Instance UIDs stay unless given)."""
    out.mkdir(parents=True)
    copies = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copies.append(out / f"{i}.dcm")
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql)).all()]
    finally:
        eng.dispose()


def instance_rows(url: str) -> set[tuple[Any, ...]]:
    """(SOP Instance UID, its study, its series, path, file_missing) of every instance."""
    return set(
        query(
            url,
            "SELECT i.sop_instance_uid, st.study_instance_uid, se.series_instance_uid, i.path,"
            " i.file_missing FROM instances i JOIN studies st ON st.id = i.study_id"
            " JOIN series se ON se.id = i.series_id",
        )
    )


def spool_state(spool: Path) -> dict[str, str]:
    """Every spooled file (relative path) and the hash of its bytes."""
    return {
        str(p.relative_to(spool)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(spool.rglob("*.dcm"))
        if ".incoming" not in p.parts
    }


def assert_spool_agrees(spool: Path, url: str) -> None:
    """Each row's file lies in its own study/series folder and its header says so."""
    for sop, study, series, path, missing in instance_rows(url):
        assert not missing
        assert Path(path) == spool / study / series / f"{sop}.dcm"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
            study,
            series,
            sop,
        )


def wait_log(d: Daemon, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not logged:\n{d.log()[-3000:]}")
        time.sleep(0.1)


def send_ok(d: Daemon, files: list[Path]) -> None:
    out = storescu(d.port, *files)
    assert store_statuses(out.stderr + out.stdout) == ["Success"] * len(files), out.stderr


# -- finding 1: the same SOP Instance UID under another study, series or patient -----------


def test_instance_resent_under_another_study_series_or_patient_is_refused(
    make_daemon, db_url, tmp_path
) -> None:
    study = generate_study(tmp_path / "s1", seed=21, slices=5, size=32)
    files = list(study.files)
    d = make_daemon(db_url).start()
    send_ok(d, files)
    d.wait_state("QUEUED")
    rows, spooled = instance_rows(db_url), spool_state(d.spool)
    jobs = query(db_url, "SELECT id, state FROM jobs")
    split = generate_uid()
    variants = {
        # a PACS study split as reported: new Study Instance UID and another patient, the
        # same series and SOP Instance UIDs
        "Series Instance UID already stored under another study": rewrite(
            files, tmp_path / "split", StudyInstanceUID=split, PatientID=OTHER_PATIENT
        ),
        # the same with new series UIDs: the SOP Instance UIDs alone conflict
        "SOP Instance already stored under another study": rewrite(
            files,
            tmp_path / "split-series",
            StudyInstanceUID=split,
            SeriesInstanceUID=generate_uid(),
            PatientID=OTHER_PATIENT,
        ),
        "SOP Instance already stored under another series": rewrite(
            files, tmp_path / "reseries", SeriesInstanceUID=generate_uid()
        ),
        "Patient ID differs from the stored study's": rewrite(
            files, tmp_path / "repatient", PatientID=OTHER_PATIENT
        ),
    }
    for conflict, copies in variants.items():
        out = storescu(d.port, *copies, extra=("--no-halt",))
        statuses = store_statuses(out.stderr + out.stdout)
        assert statuses == ["Error: CannotUnderstand"] * len(copies), (conflict, statuses)
        assert f"refused with 0xC001: {conflict}" in d.log()
    # nothing changed on disk or in the database; the job is untouched
    assert instance_rows(db_url) == rows
    assert spool_state(d.spool) == spooled
    assert not (d.spool / split).exists()
    assert_spool_agrees(d.spool, db_url)
    assert query(db_url, "SELECT id, state FROM jobs") == jobs
    (row,) = d.worklist()
    assert (row["study_instance_uid"], row["state"]) == (study.study_instance_uid, "QUEUED")
    assert (row["patient_id"], row["num_instances"]) == (study.patient_id, len(files))
    assert OTHER_PATIENT not in d.log()
    assert study.patient_id not in d.log()


# -- finding 2: UIDs longer than 64 characters are refused whole, not cut and accepted -----


def test_uid_rules_of_ps3_5() -> None:
    assert uid_problem("1.2.840.10008.1.2.1") is None
    assert uid_problem("1.2.0.3") is None
    assert uid_problem("1." + "2" * 63) == "longer than 64 characters"
    assert uid_problem("1.2.03") == "a component has a leading zero"
    assert uid_problem("1.2.3a") == "not digits separated by dots"
    assert uid_problem("1..2") == "not digits separated by dots"
    assert uid_problem(" 1.2") == "not digits separated by dots"


def test_long_and_malformed_uids_are_refused_not_truncated(make_daemon, db_url, tmp_path) -> None:
    study = generate_study(tmp_path / "s", seed=22, slices=3, size=32)
    src = [study.files[0]]
    prefix = "1.2.826.0.1.3680043.9.7133." + "1" * 236  # the first 64 characters are shared
    bad = {
        "invalid SOPInstanceUID: longer than 64 characters": rewrite(
            src, tmp_path / "long-a", SOPInstanceUID=prefix + "1"
        )
        + rewrite(src, tmp_path / "long-b", SOPInstanceUID=prefix + "2"),
        "invalid StudyInstanceUID: longer than 64 characters": rewrite(
            src, tmp_path / "long-study", SOPInstanceUID=generate_uid(), StudyInstanceUID=prefix
        ),
        "invalid SeriesInstanceUID: a component has a leading zero": rewrite(
            src, tmp_path / "zero", SOPInstanceUID=generate_uid(), SeriesInstanceUID="1.2.03"
        ),
    }
    # a legal UID of odd length, stored with its trailing NUL pad
    odd = "1.2.826.0.1.3680043.9.7133.1.77"
    assert len(odd) % 2 == 1
    padded = rewrite(src, tmp_path / "odd", SOPInstanceUID=odd)
    raw = pydicom.dcmread(padded[0]).get_item("SOPInstanceUID").value
    assert raw == odd.encode() + b"\x00"
    good = [*study.files, *padded]
    d = make_daemon(db_url).start()
    bad_files = [f for copies in bad.values() for f in copies]
    out = storescu(d.port, *bad_files, *good, extra=("--no-halt",))
    statuses = store_statuses(out.stderr + out.stdout)
    assert statuses == ["Error: DataSetDoesNotMatchSOPClass"] * len(bad_files) + ["Success"] * len(
        good
    )
    for reason in bad:
        assert f"refused with 0xA900: {reason}" in d.log()
    wait_log(d, f"{len(good)} stored, 0 duplicate, {len(bad_files)} failed")
    expected = {read_meta(f).sop_instance_uid for f in good}
    assert {r[0] for r in instance_rows(db_url)} == expected
    assert {r[1] for r in instance_rows(db_url)} == {study.study_instance_uid}
    assert len(spool_state(d.spool)) == len(good)
    assert_spool_agrees(d.spool, db_url)


# -- finding 8: an identical resend is answered Success and changes nothing ---------------


def test_identical_resend_does_not_reopen_or_requeue(make_daemon, db_url, tmp_path) -> None:
    study = generate_study(tmp_path / "s", seed=23, slices=4, size=32)
    files = list(study.files)
    d = make_daemon(db_url).start()
    send_ok(d, files)
    d.wait_state("QUEUED")
    jobs = query(db_url, "SELECT id, state FROM jobs")
    events = query(db_url, "SELECT state, reason FROM study_events ORDER BY id")
    assert [state for _, state in jobs] == [JobState.QUEUED]
    for _ in range(2):
        send_ok(d, files)
    wait_log(d, f"released: 0 stored, {len(files)} duplicate", timeout=30)
    assert d.log().count(f"released: 0 stored, {len(files)} duplicate") == 2
    # the record is written before Success is answered: nothing is pending here
    assert query(db_url, "SELECT id, state FROM jobs") == jobs
    assert query(db_url, "SELECT state, reason FROM study_events ORDER BY id") == events
    (row,) = d.worklist()
    assert (row["state"], row["num_instances"]) == ("QUEUED", len(files))
    assert "new instances arrived" not in d.log()


def _meta_rows(files: list[Path], spool: Spool) -> list[tuple[Any, Path]]:
    placed = []
    for f in files:
        m = read_meta(f)
        path, _ = spool.write(
            f.read_bytes(), m.study_instance_uid, m.series_instance_uid, m.sop_instance_uid
        )
        placed.append((m, path))
    return placed


def test_only_new_content_reopens_a_finished_study(engine, tmp_path) -> None:
    """SCORED and DELIVERED studies stay so on an exact resend; a new instance reopens,
    and so does a resend of a FAILED study (the operator's way to retry it)."""
    study = generate_study(tmp_path / "s", seed=24, slices=3, size=32)
    placed = _meta_rows(list(study.files), Spool(tmp_path / "spool", 1))
    with Session(engine) as s, s.begin():
        for m, path in placed[:-1]:
            assert record_instance(s, m, str(path), 1, None)
        complete_due_studies(s, 0, 600)
    for finished in (StudyState.SCORED, StudyState.DELIVERED):
        with Session(engine) as s, s.begin():
            st = s.scalars(sa.select(Study)).one()
            set_state(s, st, finished)
            s.execute(sa.update(Job).values(state=JobState.DONE))
        with Session(engine) as s, s.begin():
            m, path = placed[0]
            assert not record_instance(s, m, str(path), 1, None)
        with Session(engine) as s:
            assert s.scalars(sa.select(Study.state)).one() == finished
            assert s.scalars(sa.select(Job.state)).all() == [JobState.DONE]
    with Session(engine) as s, s.begin():
        m, path = placed[-1]
        assert record_instance(s, m, str(path), 1, None)
    with Session(engine) as s:
        assert s.scalars(sa.select(Study.state)).one() == StudyState.RECEIVING
    # a study that ended without a result is retried by an exact resend
    with Session(engine) as s, s.begin():
        set_state(s, s.scalars(sa.select(Study)).one(), StudyState.FAILED, "scoring failed")
    with Session(engine) as s, s.begin():
        m, path = placed[0]
        assert not record_instance(s, m, str(path), 1, None)
    with Session(engine) as s:
        st = s.scalars(sa.select(Study)).one()
        assert (st.state, st.state_reason) == (StudyState.RECEIVING, "resent")


# -- defence in depth: the worker and restart reconcile check files against their rows ----


def test_worker_never_scores_a_file_that_is_not_its_instance(engine, tmp_path) -> None:
    """A spooled file replaced by another patient's instance fails the study unscored."""
    spool = Spool(tmp_path / "spool", 1)
    mine = generate_study(tmp_path / "a", seed=25, slices=3, size=32, patient_id="PAT-A")
    other = generate_study(tmp_path / "b", seed=26, slices=3, size=32, patient_id="PAT-B")
    fine = generate_study(tmp_path / "c", seed=27, slices=3, size=32, patient_id="PAT-C")
    relabelled = generate_study(tmp_path / "d", seed=28, slices=3, size=32, patient_id="PAT-D")
    placed = {
        s.study_instance_uid: _meta_rows(list(s.files), spool) for s in (mine, fine, relabelled)
    }
    with Session(engine) as s, s.begin():
        for rows in placed.values():
            for m, path in rows:
                record_instance(s, m, str(path), 1, None)
        complete_due_studies(s, 0, 600)
    # on disk: one of "mine" is now another patient's file; one of "relabelled" names
    # another Patient ID in its header (what a row from an older version could point at)
    placed[mine.study_instance_uid][1][1].write_bytes(other.files[0].read_bytes())
    target = placed[relabelled.study_instance_uid][0][1]
    rewrite([target], tmp_path / "relabel", PatientID="PAT-B")
    target.write_bytes((tmp_path / "relabel" / "0.dcm").read_bytes())

    scored: list[list[Path]] = []

    def process(paths: Any, out_dir: Path, key: str) -> Skipped:
        scored.append(list(paths))
        return Skipped("test processor")

    settings = from_dict({"storage": {"spool_dir": str(tmp_path / "spool")}}, tmp_path)
    worker = Worker(settings, engine, process, name="test:1:w")
    while worker.run_once():
        pass
    assert scored == [[p for _, p in placed[fine.study_instance_uid]]]
    with Session(engine) as s:
        states = {st.study_instance_uid: st for st in s.scalars(sa.select(Study))}
        for uid in (mine.study_instance_uid, relabelled.study_instance_uid):
            assert states[uid].state == StudyState.FAILED
            reason = states[uid].state_reason or ""
            assert reason.startswith("identity check failed: file of SOP Instance")
            assert "PAT-" not in reason
        assert "belongs to study" in (states[mine.study_instance_uid].state_reason or "")
        assert "another Patient ID" in (states[relabelled.study_instance_uid].state_reason or "")
        assert states[fine.study_instance_uid].state == StudyState.SKIPPED
        failed = s.scalars(sa.select(Job).where(Job.state == JobState.FAILED)).all()
        assert len(failed) == 2


def test_restart_reconcile_does_not_index_a_file_that_disagrees_with_its_folder(
    make_daemon, db_url, tmp_path
) -> None:
    study = generate_study(tmp_path / "s1", seed=29, slices=3, size=32)
    files = list(study.files)
    d = make_daemon(db_url).start()
    send_ok(d, files)
    d.wait_state("QUEUED")
    d.stop()
    rows = instance_rows(db_url)
    series = read_meta(files[0]).series_instance_uid
    folder = d.spool / study.study_instance_uid / series
    # a file in S1's folder whose header names another study and patient (new SOP UID)
    (foreign,) = rewrite(
        [files[0]],
        tmp_path / "foreign",
        SOPInstanceUID=generate_uid(),
        StudyInstanceUID=generate_uid(),
        PatientID=OTHER_PATIENT,
    )
    stray = folder / f"{pydicom.dcmread(foreign).SOPInstanceUID}.dcm"
    stray.write_bytes(foreign.read_bytes())
    # and one of S1's instances copied into another study's folder
    split = generate_uid()
    (moved,) = rewrite([files[1]], tmp_path / "moved", StudyInstanceUID=split)
    sop = read_meta(files[1]).sop_instance_uid
    (d.spool / split / series).mkdir(parents=True)
    elsewhere = d.spool / split / series / f"{sop}.dcm"
    elsewhere.write_bytes(moved.read_bytes())
    # its row pointing there, as the old version left it after a study split resend
    eng = sa.create_engine(db_url)
    with eng.begin() as c:
        c.execute(
            sa.text("UPDATE instances SET path = :p WHERE sop_instance_uid = :u"),
            {"p": str(elsewhere), "u": sop},
        )
    eng.dispose()
    d.start()
    assert instance_rows(db_url) == rows
    assert_spool_agrees(d.spool, db_url)
    log = d.log()
    assert f"{stray} not indexed: header names another study than its folder" in log
    assert "instance stored elsewhere; not indexed" in log
    assert "2 not what their place says" in log
    assert f"instance {sop} pointed at another study's file; pointed back" in log
    assert "1 rows pointed back" in log
    assert OTHER_PATIENT not in log
    assert [r["study_instance_uid"] for r in d.worklist()] == [study.study_instance_uid]


def test_racing_stores_of_one_instance_under_two_studies_record_one(engine, tmp_path) -> None:
    """Two associations at once, one SOP Instance UID, two studies: one wins, one refused."""

    def meta(study: str, patient: str) -> InstanceMeta:
        sop_class, syntax = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
        return InstanceMeta(study, f"{study}.1", "1.2.3.4.5", sop_class, syntax, patient_id=patient)

    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def store(m: InstanceMeta) -> None:
        barrier.wait()
        try:
            with Session(engine) as s, s.begin():
                record_instance(s, m, f"/spool/{m.study_instance_uid}", 1, None)
            outcomes.append(m.study_instance_uid)
        except IdentityConflict as err:
            outcomes.append(str(err))

    threads = [
        threading.Thread(target=store, args=(meta(uid, pid),))
        for uid, pid in (("1.2.3.100", "PAT-A"), ("1.2.3.200", "PAT-B"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winner = next(o for o in outcomes if o.startswith("1.2.3."))
    assert sorted(outcomes) == sorted([winner, "SOP Instance already stored under another study"])
    url = engine.url.render_as_string(hide_password=False)
    sql = "SELECT s.study_instance_uid, i.path FROM instances i JOIN studies s ON s.id = i.study_id"
    assert query(url, sql) == [(winner, f"/spool/{winner}")]
    assert query(url, "SELECT study_instance_uid FROM studies") == [(winner,)]
