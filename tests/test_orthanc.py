"""A real PACS on loopback: Orthanc (Debian's package) forwards CT studies to triaged.

Orthanc runs with the shipped ``deploy/orthanc/orthanc.json`` and ``forward.lua``; the test
only moves storage, ports and triaged's address to private values and shortens
``StableAge``. A study uploaded to Orthanc's REST API becomes stable, the Lua script sends
its CT series to a real ``triaged serve``, which scores it with tiny registered models and
stores its SR, Secondary Capture and SEG back into the same study in Orthanc, where the
test finds them through the REST API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydicom
import pytest

from tests.conftest import REPO, Daemon, free_port, storescu, write_config
from tests.pipeline.conftest import TEST_PIPELINE as PIPELINE
from tests.pipeline.conftest import register_cbam, register_fusion
from triaged.registry import ModelStore
from triaged.synthetic import generate_study

DEPLOY = REPO / "deploy" / "orthanc"
STABLE_AGE = 2
USER, PASSWORD = "admin", "not-a-secret"  # orthanc.json: admin / ${ORTHANC_ADMIN_PASSWORD}
SOP_CT = "1.2.840.10008.5.1.4.1.1.2"
SOP_SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
SOP_SC = "1.2.840.10008.5.1.4.1.1.7"
SOP_SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COVID_19 = "840539006"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.3) -> T:
    """Poll ``probe`` until it returns something other than None (or raise naming ``what``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got is not None:
            return got
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Orthanc:
    """One private Orthanc process configured from the shipped deployment files."""

    def __init__(self, root: Path, triaged_port: int) -> None:
        assert shutil.which("Orthanc"), "Orthanc is not installed (apt-get install orthanc)"
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.triaged_port = triaged_port
        self.log_path = root / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True)
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}", auth=(USER, PASSWORD), timeout=30
        )

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = json.loads((DEPLOY / "orthanc.json").read_text())
        triaged = cfg["DicomModalities"]["triaged"]
        triaged.update(Host="127.0.0.1", Port=self.triaged_port)
        cfg.update(
            StorageDirectory=str(self.root / "db"),
            IndexDirectory=str(self.root / "db"),
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
            LuaScripts=[str(DEPLOY / "forward.lua")],
            StableAge=STABLE_AGE,
            RemoteAccessAllowed=False,
            # Orthanc 1.10 has no OnHeartBeat timer: the test calls it through the REST API.
            ExecuteLuaEnabled=True,
        )
        return cfg

    def start(self) -> Orthanc:
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=1))
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process lifetime
        self.proc = subprocess.Popen(
            ["Orthanc", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1", "ORTHANC_ADMIN_PASSWORD": PASSWORD},
            cwd=self.root,
        )

        def up() -> bool | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log()}")
            try:
                return True if self.client.get("/system").status_code == 200 else None
            except httpx.TransportError:
                return None

        wait_for("Orthanc to answer", up, timeout=30, every=0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    # -- REST helpers --------------------------------------------------------------------------
    def get(self, uri: str) -> Any:
        r = self.client.get(uri)
        r.raise_for_status()
        return r.json()

    def upload(self, files: list[Path]) -> None:
        for f in files:
            r = self.client.post("/instances", content=f.read_bytes())
            assert r.status_code == 200, r.text
            assert r.json()["Status"] == "Success", r.text

    def study_id(self, study_instance_uid: str) -> str:
        r = self.client.post("/tools/lookup", content=study_instance_uid)
        r.raise_for_status()
        (hit,) = [h for h in r.json() if h["Type"] == "Study"]
        return str(hit["ID"])

    def series_by_sop_class(self, study_id: str) -> dict[str, list[dict[str, Any]]]:
        """The study's series grouped by the SOP Class of their first instance."""
        out: dict[str, list[dict[str, Any]]] = {}
        for series in self.get(f"/studies/{study_id}/series"):
            first = series["Instances"][0]
            sop = self.client.get(f"/instances/{first}/metadata/SopClassUid").text
            out.setdefault(sop, []).append(series)
        return out

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))

    def forward_jobs(self) -> list[dict[str, Any]]:
        return [
            j
            for j in self.get("/jobs?expand")
            if j["Type"] == "DicomModalityStore" and j["Content"]["RemoteAet"] == "TRIAGED"
        ]

    def execute_lua(self, script: str) -> str:
        r = self.client.post("/tools/execute-script", content=script)
        assert r.status_code == 200, r.text
        return r.text


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    register_fusion(store, seed=0)
    register_cbam(store)
    torch.set_num_threads(before)
    return root


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[[int], Orthanc]]:
    made: list[Orthanc] = []

    def make(triaged_port: int) -> Orthanc:
        o = Orthanc(tmp_path / f"orthanc{len(made)}", triaged_port)
        made.append(o)
        return o

    yield make
    for o in made:
        o.stop()


def study_row(d: Daemon, uid: str) -> dict[str, Any] | None:
    rows = [r for r in d.worklist() if r["study_instance_uid"] == uid]
    return rows[0] if rows else None


def wait_delivered(d: Daemon, uid: str, timeout: float) -> dict[str, Any]:
    """Wait for DELIVERED; a study that ends FAILED or SKIPPED fails at once with its reason."""

    def probe() -> dict[str, Any] | None:
        row = study_row(d, uid)
        if row is not None and row["state"] in ("FAILED", "SKIPPED"):
            pytest.fail(f"study {row['state']}: {row['state_reason']}\n{d.log()[-4000:]}")
        return row if row is not None and row["state"] == "DELIVERED" else None

    return wait_for("the study to be DELIVERED", probe, timeout, every=0.5)


def test_study_forwarded_by_orthanc_scored_and_results_stored_in_the_same_study(
    make_daemon: Callable[..., Daemon],
    orthanc_factory: Callable[[int], Orthanc],
    model_store: Path,
    tmp_path: Path,
) -> None:
    pipeline = write_config(
        tmp_path / "pipeline.toml", {**PIPELINE, "model_store": str(model_store)}
    )
    d = make_daemon(
        pipelines=[str(pipeline)],
        dicom={"allowed_calling_aets": ["ORTHANC"]},
        worker={"in_process": 1, "lease_seconds": 30, "poll_seconds": 0.2},
        delivery={"max_attempts": 10, "backoff_seconds": 0.5, "backoff_max_seconds": 1.0},
    )
    pacs = orthanc_factory(d.port)
    d.extra["destinations"] = [
        {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
    ]
    pacs.start()
    d.start()
    study = generate_study(
        tmp_path / "s", seed=41, positive=True, slices=16, size=64, extra_series=("localizer",)
    )
    pacs.upload(study.files)

    row = wait_delivered(d, study.study_instance_uid, timeout=180)
    assert row["num_instances"] == len(study.files)  # both CT series came through Orthanc

    sid = pacs.study_id(study.study_instance_uid)

    def results_arrived() -> dict[str, list[dict[str, Any]]] | None:
        by_sop = pacs.series_by_sop_class(sid)
        return by_sop if {SOP_SR_3D, SOP_SC, SOP_SEG} <= by_sop.keys() else None

    by_sop = wait_for("SR, SC and SEG in Orthanc", results_arrived, timeout=30)
    assert sorted(by_sop) == sorted({SOP_CT, SOP_SR_3D, SOP_SC, SOP_SEG})
    for sop in (SOP_SR_3D, SOP_SC, SOP_SEG):
        (series,) = by_sop[sop]
        (instance,) = series["Instances"]
        tags = pacs.tags(instance)
        assert tags["StudyInstanceUID"] == study.study_instance_uid
        assert tags["PatientID"] == study.patient_id
        assert tags["Manufacturer"] == "triaged"
        assert tags["SOPClassUID"] == sop
        if sop == SOP_SC:
            assert tags["BurnedInAnnotation"] == "YES"
        if sop == SOP_SR_3D:
            assert COVID_19 in json.dumps(tags)  # the finding, SNOMED CT "COVID-19"
        # the stored object is a complete DICOM file that pydicom reads back
        ds = pydicom.dcmread(_download(pacs, instance, tmp_path / f"{instance}.dcm"), force=False)
        assert ds.SOPClassUID == sop

    # The results made the study stable again: nothing is forwarded twice, nothing reopens.
    time.sleep(STABLE_AGE + 2.5)
    jobs = pacs.forward_jobs()
    assert len(jobs) == 1, jobs
    assert jobs[0]["State"] == "Success"
    assert jobs[0]["Content"]["InstancesCount"] == len(study.files)
    after = study_row(d, study.study_instance_uid)
    assert after is not None and after["state"] == "DELIVERED"
    assert after["num_instances"] == len(study.files)
    assert "triaged: study" in pacs.log()  # the Lua script said what it queued


def _download(pacs: Orthanc, instance_id: str, dest: Path) -> Path:
    r = pacs.client.get(f"/instances/{instance_id}/file")
    r.raise_for_status()
    dest.write_bytes(r.content)
    return dest


def test_failed_forward_is_resubmitted_once_triaged_is_up(
    make_daemon: Callable[..., Daemon],
    orthanc_factory: Callable[[int], Orthanc],
    tmp_path: Path,
) -> None:
    # receive only (no pipeline): this test is about the PACS side's retry
    d = make_daemon(dicom={"allowed_calling_aets": ["ORTHANC"]})
    pacs = orthanc_factory(d.port).start()
    study = generate_study(tmp_path / "s", seed=42, positive=False, slices=6, size=32)
    pacs.upload(study.files)

    def failed() -> list[dict[str, Any]] | None:
        jobs = pacs.forward_jobs()
        return jobs if jobs and all(j["State"] == "Failure" for j in jobs) else None

    (job,) = wait_for("the forward to fail while triaged is down", failed, timeout=30)
    assert "Connection refused" in job["ErrorDetails"]

    d.start()
    out = pacs.execute_lua("OnHeartBeat()")
    assert f"resubmitting failed forward job {job['ID']}" in out

    def received() -> dict[str, Any] | None:
        row = study_row(d, study.study_instance_uid)
        return row if row is not None and row["num_instances"] == len(study.files) else None

    wait_for("triaged to receive the resubmitted study", received, timeout=60)
    (again,) = pacs.forward_jobs()
    assert again["ID"] == job["ID"] and again["State"] == "Success"
    assert pacs.execute_lua("OnHeartBeat()") == ""  # nothing left to resubmit


def test_orthanc_accepts_only_listed_modalities_and_its_admin(
    orthanc_factory: Callable[[int], Orthanc],
    tmp_path: Path,
) -> None:
    pacs = orthanc_factory(free_port()).start()
    # the REST API wants the admin password from the environment
    base = str(pacs.client.base_url)
    assert httpx.get(f"{base}/system").status_code == 401
    assert httpx.get(f"{base}/system", auth=(USER, "wrong")).status_code == 401
    study = generate_study(tmp_path / "s", seed=43, positive=False, slices=2, size=32)
    stranger = storescu(pacs.dicom_port, *study.files, aet="STRANGER", aec="ORTHANC")
    assert stranger.returncode != 0
    assert pacs.get("/instances") == []
    wrong_called = storescu(pacs.dicom_port, *study.files, aet="TRIAGED", aec="NOT-ORTHANC")
    assert wrong_called.returncode != 0
    listed = storescu(pacs.dicom_port, *study.files, aet="TRIAGED", aec="ORTHANC")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert len(pacs.get("/instances")) == len(study.files)
