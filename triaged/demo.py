"""`triaged demo`: a newcomer's first run, on synthetic data only.

It generates synthetic chest-CT studies, starts the daemon on its embedded SQLite default
in a private folder, pushes the studies over DICOM as a PACS would, waits until they
are complete and shows the worklist. Everything it makes is labelled SYNTHETIC and is
not for clinical use.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy.orm import Session

from triaged.config import from_dict
from triaged.service import Service
from triaged.synthetic import SyntheticStudy, generate_study
from triaged.worklist.studies import list_studies


def _step(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def push(study: SyntheticStudy, host: str, port: int, called_ae: str) -> int:
    """Send every file of a study on one association, like a PACS forwarding a study."""
    files = study.files
    ae = AE(ae_title="DEMO_PACS")
    contexts: dict[str, str] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        contexts[str(ds.SOPClassUID)] = str(ds.file_meta.TransferSyntaxUID)
    for sop_class, ts in contexts.items():
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the daemon refused the association on port {port}")
    ok = 0
    try:
        for f in files:
            status = assoc.send_c_store(f)
            ok += int(getattr(status, "Status", -1) == 0)
    finally:
        assoc.release()
    return ok


def run_demo(workdir: Path, studies: int = 4, slices: int = 32, size: int = 128) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    settings = from_dict(
        {
            "pipelines": [],
            "dicom": {"port": _free_port()},
            "storage": {"spool_dir": "spool", "min_free_mb": 64},
            "database": {"url": "sqlite:///worklist.db"},
            "assembly": {"quiet_seconds": 2, "max_wait_seconds": 120, "sweep_seconds": 0.5},
        },
        workdir.resolve(),
    )
    _step(f"generating {studies} synthetic chest-CT studies (SYNTHETIC, not for clinical use)")
    made = [
        generate_study(
            workdir / "studies" / f"study{i:02d}",
            seed=100 + i,
            positive=i % 2 == 0,
            slices=slices,
            size=size,
        )
        for i in range(studies)
    ]
    _step(
        f"starting the daemon: AE {settings.dicom.ae_title} on port {settings.dicom.port}, "
        f"database {settings.database.url}"
    )
    service = Service(settings)
    service.start()
    try:
        for s in made:
            n = push(s, "127.0.0.1", settings.dicom.port, settings.dicom.ae_title)
            _step(
                f"pushed study {s.study_instance_uid[:30]}...: {n}/{len(s.files)} instances "
                "acknowledged"
            )
        _step("waiting for the studies to complete (quiet period)")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with Session(service.engine) as db:
                rows = list_studies(db)
            if len(rows) == len(made) and all(r.state != "RECEIVING" for r in rows):
                break
            time.sleep(0.5)
        with Session(service.engine) as db:
            rows = list_studies(db)
    finally:
        service.stop()
    _step("worklist:")
    for r in rows:
        d = asdict(r)
        print(
            f"  {d['state']:<9} {d['patient_id'] or '':<14} {d['num_series']} series "
            f"{d['num_instances']:>4} instances  {d['study_instance_uid']}"
        )
    done = sum(r.state != "RECEIVING" for r in rows)
    _step(f"{done}/{len(made)} studies complete; files in {workdir}")
    return 0 if done == len(made) else 1
