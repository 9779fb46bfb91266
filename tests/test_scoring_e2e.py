"""End to end on loopback: storescu -> triaged serve -> scoring -> SR/SC/SEG -> storescp (the PACS).

The models are real architectures at toy sizes registered by the test (tests/pipeline/conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa

from tests.conftest import DCMTK_ENV, free_port, storescu, wait_listening, write_config
from tests.pipeline.conftest import TEST_PIPELINE as PIPELINE
from tests.pipeline.conftest import register_cbam, register_fusion
from triaged.registry import ModelStore
from triaged.synthetic import generate_study


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    register_fusion(store, seed=0)
    register_cbam(store)
    return root


@pytest.fixture
def pipeline_file(tmp_path: Path, model_store: Path) -> Path:
    path = tmp_path / "pipeline.toml"
    write_config(path, {**PIPELINE, "model_store": str(model_store)})
    return path


class PACS:
    """dcmtk storescp playing the PACS: every received object is a uniquely named file."""

    def __init__(self, root: Path, port: int, refuse: bool = False) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        args = ["storescp", "-aet", "PACS", "+uf", "-od", str(self.dir), "+xa"]
        if refuse:
            args.append("--refuse")
        self.proc = subprocess.Popen(
            [*args, str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_listening(port)

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in self.files()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def pacs_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[PACS] = []

    def make(port: int | None = None, refuse: bool = False) -> PACS:
        p = PACS(tmp_path / f"pacs{len(made)}", port or free_port(), refuse)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def scoring_daemon(make_daemon, pipeline_file: Path, pacs_port: int, db_url=None, in_process=1):
    return make_daemon(
        db_url,
        pipelines=[str(pipeline_file)],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        delivery={"max_attempts": 20, "backoff_seconds": 0.5, "backoff_max_seconds": 1.0},
        worker={"in_process": in_process, "lease_seconds": 10, "poll_seconds": 0.2},
    )


def results(url: str) -> list[dict[str, Any]]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return [
                dict(r._mapping)
                for r in c.execute(
                    sa.text(
                        "SELECT r.*, s.study_instance_uid FROM results r "
                        "JOIN studies s ON s.id = r.study_id ORDER BY r.id"
                    )
                )
            ]
    finally:
        eng.dispose()


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_study_scored_and_results_delivered_into_same_study(
    make_daemon, pacs_factory, pipeline_file, tmp_path
) -> None:
    pacs = pacs_factory()
    study = generate_study(
        tmp_path / "s", seed=21, positive=True, slices=16, size=64, extra_series=("localizer",)
    )
    d = scoring_daemon(make_daemon, pipeline_file, pacs.port).start()
    out = storescu(d.port, *study.files)
    assert out.returncode == 0, out.stderr
    rows = d.wait_state("DELIVERED", timeout=120)
    row = rows[0]
    assert row["study_instance_uid"] == study.study_instance_uid
    received = pacs.datasets()
    kinds = sorted(str(ds.Modality) for ds in received)
    assert kinds == ["OT", "SEG", "SR"] or kinds == ["SC", "SEG", "SR"] or len(kinds) in (2, 3)
    for ds in received:
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.PatientID == study.patient_id
        assert ds.Manufacturer == "triaged"
    for f in pacs.files():
        assert dciodvfy_errors(f) == [], f
    (res,) = results(d.db_url)
    assert 0.0 <= res["fusion_probability"] <= 1.0
    # offline scoring of the same files gives the same numbers
    offline = subprocess.run(
        [
            sys.executable,
            "-m",
            "triaged.cli",
            "score",
            "--json",
            "--config",
            str(d.config),
            *map(str, study.files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert offline.returncode == 0, offline.stderr
    (scored,) = json.loads(offline.stdout)
    assert scored["fusion_probability"] == pytest.approx(res["fusion_probability"], abs=1e-9)
    assert scored["cbam_probability"] == pytest.approx(res["cbam_probability"], abs=1e-9)
    assert scored["priority"] == res["priority"]


def test_destination_down_then_up_delivers_once(
    make_daemon, pacs_factory, pipeline_file, tmp_path
) -> None:
    port = free_port()
    study = generate_study(tmp_path / "s", seed=22, positive=True, slices=12, size=64)
    d = scoring_daemon(make_daemon, pipeline_file, port).start()
    storescu(d.port, *study.files)
    d.wait_state("SCORED", timeout=120)
    time.sleep(2.5)  # several failed attempts while the PACS is down
    pacs = pacs_factory(port)
    d.wait_state("DELIVERED", timeout=60)
    time.sleep(1.0)
    uids = [str(ds.SOPInstanceUID) for ds in pacs.datasets()]
    assert len(uids) == len(set(uids)) >= 2, d.log()[-6000:]
    assert "association aborted" in d.log() or "connection failed" in d.log()


def test_refusing_destination_is_dead_lettered(
    make_daemon, pacs_factory, pipeline_file, tmp_path
) -> None:
    pacs = pacs_factory(refuse=True)
    study = generate_study(tmp_path / "s", seed=23, positive=False, slices=12, size=64)
    d = scoring_daemon(make_daemon, pipeline_file, pacs.port).start()
    storescu(d.port, *study.files)
    rows = d.wait_state("FAILED", timeout=120)
    assert "association rejected" in rows[0]["state_reason"]
    eng = sa.create_engine(d.db_url)
    with eng.connect() as c:
        attempts = c.execute(sa.text("SELECT state, attempts FROM deliveries")).all()
    eng.dispose()
    # storescp --refuse drops the connection right after its A-ASSOCIATE-RJ, so a try can
    # see an abort (transient, retried) before one sees the rejection; after the rejection
    # there is no further try.
    tries = [line for line in d.log().splitlines() if "delivery 1 of" in line]
    assert tries[-1].endswith("association rejected (DEAD)"), tries
    assert all("association aborted" in t for t in tries[:-1]), tries
    assert attempts and all(s == "DEAD" and a == len(tries) for s, a in attempts)
    time.sleep(3 * 2.0)  # three delivery sweeps: a dead letter is not retried
    assert [line for line in d.log().splitlines() if "delivery 1 of" in line] == tries
    assert pacs.files() == []
    listed = d.cli("deliveries", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [{"destination": "pacs", "pending": 0, "dead": 3}]

    # the PACS administrator fixes the refusal; the operator resends the dead letters
    pacs.stop()
    fixed = pacs_factory(pacs.port)
    out = d.cli("deliveries", "retry", "--destination", "pacs")
    assert out.returncode == 0 and "requeued 3 dead-lettered deliveries" in out.stdout, out
    d.wait_state("DELIVERED", timeout=60)
    uids = [str(ds.SOPInstanceUID) for ds in fixed.datasets()]
    assert len(uids) == len(set(uids)) == 3


def test_kill_while_scoring_then_scored_and_delivered_once(
    make_daemon, pacs_factory, pipeline_file, tmp_path
) -> None:
    pacs = pacs_factory()
    study = generate_study(tmp_path / "s", seed=24, positive=True, slices=40, size=128)
    d = scoring_daemon(make_daemon, pipeline_file, pacs.port).start()
    storescu(d.port, *study.files)
    d.wait_state("SCORING", timeout=120)
    d.kill()
    d.start()
    d.wait_state("DELIVERED", timeout=180)
    time.sleep(1.0)
    assert len(results(d.db_url)) == 1
    uids = [str(ds.SOPInstanceUID) for ds in pacs.datasets()]
    assert len(uids) == len(set(uids)) >= 2


def _running_job_owner(url: str) -> str | None:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return c.execute(
                sa.text("SELECT lease_owner FROM jobs WHERE state = 'RUNNING' LIMIT 1")
            ).scalar()
    finally:
        eng.dispose()


def test_two_workers_on_postgresql_one_killed_each_study_scored_once(
    make_daemon, pacs_factory, pipeline_file, tmp_path
) -> None:
    """Two `triaged worker` processes share one PostgreSQL; one is killed mid-study."""
    from tests.conftest import _pg_database

    gen = _pg_database("workers")
    url = next(gen)
    try:
        pacs = pacs_factory()
        d = scoring_daemon(make_daemon, pipeline_file, pacs.port, url, in_process=0).start()
        workers = {
            w.pid: w
            for w in (
                subprocess.Popen(
                    [sys.executable, "-m", "triaged.cli", "worker", "--config", str(d.config)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(2)
            )
        }
        try:
            studies = [
                generate_study(
                    tmp_path / f"s{i}", seed=30 + i, positive=i % 2 == 0, slices=32, size=128
                )
                for i in range(4)
            ]
            for s in studies:
                storescu(d.port, *s.files)
            deadline = time.monotonic() + 120
            killed = None
            while killed is None and time.monotonic() < deadline:
                owner = _running_job_owner(url)
                pid = int(owner.split(":")[1]) if owner else None
                if pid in workers:
                    workers[pid].kill()
                    workers[pid].wait(10)
                    killed = pid
                time.sleep(0.05)
            assert killed is not None, "no worker was caught scoring"
            d.wait_state("DELIVERED", n=4, timeout=240)
        finally:
            for w in workers.values():
                if w.poll() is None:
                    w.terminate()
                    w.wait(20)
        res = results(url)
        assert sorted(r["study_instance_uid"] for r in res) == sorted(
            s.study_instance_uid for s in studies
        )
        eng = sa.create_engine(url)
        with eng.connect() as c:
            retried = c.execute(sa.text("SELECT count(*) FROM jobs WHERE attempts > 1")).scalar()
        eng.dispose()
        assert retried >= 1  # the killed worker's study was taken again after its lease
        uids = [str(ds.SOPInstanceUID) for ds in pacs.datasets()]
        assert len(uids) == len(set(uids)) >= 8
    finally:
        d.stop()
        next(gen, None)


def test_out_of_distribution_study_delivered_unflagged_with_its_reason(
    make_daemon, pacs_factory, tmp_path
) -> None:
    """The daemon path: fit-ood'd live model, a noise study sent by storescu, scored with the
    reason, not flagged, the reason in the delivered SR (dciodvfy clean) and the worklist."""
    import torch

    from tests.pipeline.test_ood import FLAG_ALL, noisy_copy
    from triaged.training.retrain import fit_existing

    torch.set_num_threads(1)
    train = tmp_path / "train"
    rows = ["path,label,split"]
    for seed in range(1, 5):
        generate_study(train / f"s{seed}", seed=seed, positive=seed % 2 == 0, slices=24, size=64)
        rows.append(f"s{seed}/axial/,{'covid' if seed % 2 == 0 else 'non-covid'},train")
    (train / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    store = ModelStore(tmp_path / "models")
    register_fusion(store, seed=0)
    register_cbam(store)
    fitted = fit_existing(store, "fusion:v1", [f"manifest:{train / 'manifest.csv'}"])
    store.promote("fusion", fitted.version)
    pipe = tmp_path / "pipeline.toml"
    write_config(pipe, {**PIPELINE, "model_store": str(store.root), "priority": FLAG_ALL})
    source = generate_study(tmp_path / "src", seed=31, positive=True, slices=16, size=64)
    files = noisy_copy(source, tmp_path / "noise")

    pacs = pacs_factory()
    d = scoring_daemon(make_daemon, pipe, pacs.port).start()
    out = storescu(d.port, *files)
    assert out.returncode == 0, out.stderr
    (row,) = d.wait_state("DELIVERED", timeout=180)
    assert row["flag"] is False and row["priority"] == 7
    assert row["ood_reason"].startswith("out of distribution: ")
    listed = d.cli("worklist")  # the table's REASON column
    assert listed.returncode == 0 and row["ood_reason"] in listed.stdout, listed
    (res,) = results(d.db_url)
    details = res["details"] if isinstance(res["details"], dict) else json.loads(res["details"])
    assert details["summary"]["ood"]["reason"] == row["ood_reason"]
    (sr,) = [f for f in pacs.files() if pydicom.dcmread(f).Modality == "SR"]
    assert row["ood_reason"] in pydicom.dcmread(sr).to_json()
    assert dciodvfy_errors(sr) == []
    eng = sa.create_engine(d.db_url)
    with eng.connect() as c:
        scored = c.execute(sa.text("SELECT reason FROM study_events WHERE state = 'SCORED'")).all()
    eng.dispose()
    assert [r[0] for r in scored] == [row["ood_reason"]]
