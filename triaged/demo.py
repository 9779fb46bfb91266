"""`triaged demo`: a newcomer's first run, end to end, on synthetic data only.

Generates synthetic chest-CT studies with ground-truth lesions, trains a small demo model on
synthetic slices (or reuses the one in the demo's model store), registers and promotes it,
starts the daemon on its embedded SQLite default with a local result destination, pushes
the studies over DICOM as a PACS would, and shows the reordered worklist in the terminal
and on the web page. Everything it makes is labelled SYNTHETIC and is not for clinical use.
A second run reuses the model and the studies, so it is faster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.status import Status
from sqlalchemy.orm import Session

from triaged.config import Settings, from_dict
from triaged.service import Service
from triaged.synthetic import SyntheticStudy, generate_study
from triaged.worklist.studies import StudyRow, list_studies

DEMO_USER = "demo"
REPO_PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "covid-ct.toml"
TERMINAL = {"DELIVERED", "SKIPPED", "FAILED"}


@dataclass(frozen=True)
class DemoSize:
    studies: int = 6
    slices: int = 40
    size: int = 128
    train_slices: int = 400
    input_size: int = 64
    epochs: int = 10
    validation: int = 8  # synthetic validation studies the study decision is fitted on


QUICK = DemoSize(
    studies=4, slices=24, size=96, train_slices=240, input_size=48, epochs=6, validation=6
)
#: Validation studies use other seeds than the shown studies (100 + i): never the same images.
VALIDATION_SEED = 500


def _step(n: int, total: int, msg: str) -> None:
    print(f"[demo {n}/{total}] {msg}", file=sys.stderr, flush=True)


def _free_port(preferred: int | None = None) -> int:
    with socket.socket() as s:
        if preferred:
            with contextlib.suppress(OSError):
                s.bind(("127.0.0.1", preferred))
                return preferred
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the model -------------------------------------------------------------------------------
def ensure_model(store_dir: Path, run_dir: Path, size: DemoSize) -> str:
    """Train and promote the demo models unless the store already has live ones."""
    from triaged.registry import ModelStore

    store = ModelStore(store_dir)
    have = {n: store.live(n) for n in ("fusion", "cbam-cnn", "infnet")}
    if all(v is not None for v in have.values()):
        return f"reusing {have['fusion'].ref} and {have['cbam-cnn'].ref} from {store_dir}"  # type: ignore[union-attr]
    from triaged.training.retrain import RetrainOptions, retrain

    opts = RetrainOptions(
        data=[f"synthetic:{size.train_slices}"],
        stages=["infnet", "1", "2", "3", "cbam"],
        backbone="efficientnet-lite0",
        init="imagenet",
        seed=0,
        fusion={
            "input_size": size.input_size,
            "infnet_size": size.input_size,
            "epochs": size.epochs,
            "batch_size": 16,
        },
        semi={
            "input_size": size.input_size,
            "epochs_first": size.epochs,
            "epochs_per_round": 1,
            "chunk": 10_000,
            "batch_size": 8,
            "scales": [1.0],
        },
        baseline={"size": size.input_size, "epochs": size.epochs * 2},
        store=store_dir,
        run_dir=run_dir,
        promote=True,
        progress=False,
        # every core: the demo trains before its daemon starts, so nothing competes
        threads=os.cpu_count() or 1,
    )
    result = retrain(opts)
    return "; ".join(result.messages[-3:]) or f"trained in {result.run_dir}"


def ensure_decision(workdir: Path, settings: Settings, size: DemoSize) -> str:
    """Fit the study decision on separate synthetic validation studies (``validate --fit``'s
    code) and promote it, unless the live fusion model already carries one."""
    from triaged.processing import processor_for
    from triaged.registry import ModelStore
    from triaged.validation.fit import FitError, fit

    live = ModelStore(settings.models.store).live("fusion")
    if live is not None and live.card.study_decision is not None:
        n = live.card.study_decision.fitted_on.n_studies
        return f"reusing the study decision of {live.ref} (fitted on {n} validation studies)"
    folder = workdir / "validation"
    shutil.rmtree(folder, ignore_errors=True)
    lines = ["study,label,patient"]
    for i in range(size.validation):
        study = generate_study(
            folder / f"val{i:02d}",
            seed=VALIDATION_SEED + i,
            positive=i % 2 == 1,
            slices=size.slices,
            size=size.size,
        )
        lines.append(f"val{i:02d},{int(study.positive)},{study.patient_id}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    processor = processor_for(settings)
    if processor is None:  # the demo's settings always name the repository's pipeline
        raise RuntimeError("the demo has no pipeline")
    try:
        out = fit(settings, folder / "labels.csv", processor, promote=True, quiet=True)
    except FitError as err:  # a model too weak to rank the studies: keep the fallbacks
        return f"no study decision ({err}); scoring with the pipeline's fallback thresholds"
    d = out.decision
    points = ", ".join(f"{op.name} p >= {op.threshold:.2f}" for op in d.operating_points)
    return (
        f"{out.version.ref} promoted: {d.aggregation.describe()} + Platt calibration, "
        f"{points} (fitted on {d.fitted_on.n_studies} synthetic validation studies)"
    )


def _probabilities(service: Service) -> dict[str, float]:
    """The current (calibrated) fusion probability of every scored study."""
    from sqlalchemy import select

    from triaged.worklist.models import Result, Study

    with Session(service.engine) as db:
        rows = db.execute(
            select(Study.study_instance_uid, Result.fusion_probability)
            .join(Result, Result.study_id == Study.id)
            .where(Result.superseded.is_(False))
        ).all()
    return {uid: float(p) for uid, p in rows if p is not None}


# -- a local PACS that receives the results ------------------------------------------------------
class ResultReceiver:
    """A minimal storage SCP standing in for the PACS: it writes what triaged sends back."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="DEMO_PACS")
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(
                    cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
                )
        server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        if server is None:  # only with block=True
            raise RuntimeError("the demo PACS did not start")
        self.server = server

    def _store(self, event: Any) -> int:
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        study = self.folder / str(ds.StudyInstanceUID)
        study.mkdir(exist_ok=True)
        ds.save_as(study / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return Status.SUCCESS

    def stop(self) -> None:
        self.server.shutdown()


def push(study: SyntheticStudy, port: int, called_ae: str) -> int:
    """Send every file of a study on one association, as a PACS forwarding a study."""
    files = study.files
    ae = AE(ae_title="DEMO_CT")
    contexts = set()
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the daemon refused the association on port {port}")
    ok = 0
    try:
        for f in files:
            status = assoc.send_c_store(f)
            ok += int(getattr(status, "Status", None) == Status.SUCCESS)
    finally:
        assoc.release()
    return ok


def _settings(workdir: Path, dicom_port: int, web_port: int, pacs_port: int) -> Settings:
    return from_dict(
        {
            "pipelines": [str(REPO_PIPELINE)],
            "dicom": {"port": dicom_port},
            "storage": {"spool_dir": "spool", "results_dir": "results", "min_free_mb": 64},
            "database": {"url": "sqlite:///worklist.db"},
            "assembly": {"quiet_seconds": 2, "max_wait_seconds": 120, "sweep_seconds": 0.5},
            "destinations": [
                {
                    "name": "demo-pacs",
                    "ae_title": "DEMO_PACS",
                    "host": "127.0.0.1",
                    "port": pacs_port,
                }
            ],
            "delivery": {"backoff_seconds": 1, "backoff_max_seconds": 5},
            "worker": {"in_process": 1, "poll_seconds": 0.3},
            "web": {"port": web_port, "secret_key": secrets.token_hex(16)},
            "models": {"store": "models"},
        },
        workdir.resolve(),
        environ={},
    )


def _print_worklist(
    rows: list[StudyRow], truth: dict[str, bool], probability: dict[str, float]
) -> None:
    print(
        f"\n  {'FLAG':<6}{'PRIO':>5}  {'STATE':<10}{'PATIENT':<15}{'TRUTH':<10}{'P':<7}STUDY",
        flush=True,
    )
    for r in rows:
        flag = "URGENT" if r.flag else ""
        t = "lesions" if truth.get(r.study_instance_uid) else "clear"
        p = probability.get(r.study_instance_uid)
        print(
            f"  {flag:<6}{r.priority:>5}  {r.state:<10}{r.patient_id or '':<15}{t:<10}"
            f"{'-' if p is None else f'{p:.3f}':<7}{r.study_instance_uid}"
        )
    print(flush=True)


def run_demo(
    workdir: Path,
    size: DemoSize = DemoSize(),
    keep_running: bool | None = None,
    fresh: bool = False,
) -> int:
    """Run the demo; returns 0 when every study ended scored and positives lead the list."""
    total = 7
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # a second run keeps the trained model (models/, runs/) and starts the rest afresh
    for leftover in ("spool", "results", "pacs", "studies"):
        shutil.rmtree(workdir / leftover, ignore_errors=True)
    for db_file in workdir.glob("worklist.db*"):
        db_file.unlink()
    logging.getLogger("triaged").setLevel(logging.WARNING)

    _step(
        1,
        total,
        f"generating {size.studies} synthetic chest-CT studies (SYNTHETIC, not for clinical use)",
    )
    studies = [
        generate_study(
            workdir / "studies" / f"study{i:02d}",
            seed=100 + i,
            positive=i % 2 == 1,
            slices=size.slices,
            size=size.size,
        )
        for i in range(size.studies)
    ]
    truth = {s.study_instance_uid: s.positive for s in studies}

    _step(
        2,
        total,
        "demo model: fusion (EfficientNet-Lite0, ImageNet init) + Inf-Net + CBAM CNN "
        "trained on synthetic slices",
    )
    t0 = time.monotonic()
    print(
        f"           {ensure_model(workdir / 'models', workdir / 'runs' / 'demo', size)} "
        f"({time.monotonic() - t0:.0f} s)",
        file=sys.stderr,
        flush=True,
    )

    pacs_port, dicom_port = _free_port(), _free_port()
    web_port = _free_port(8080)
    settings = _settings(workdir, dicom_port, web_port, pacs_port)
    _step(
        3,
        total,
        f"fitting the study decision on {size.validation} separate synthetic validation "
        "studies (triaged validate --fit): aggregation, calibration, operating points",
    )
    t0 = time.monotonic()
    print(
        f"           {ensure_decision(workdir, settings, size)} ({time.monotonic() - t0:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    _step(
        4,
        total,
        f"starting a local PACS for the results (DEMO_PACS on {pacs_port}) and the "
        f"daemon (AE {settings.dicom.ae_title} on {dicom_port}, SQLite)",
    )
    receiver = ResultReceiver(workdir / "pacs", pacs_port)
    service = Service(settings)
    service.start()
    password = secrets.token_urlsafe(9)
    from triaged.web.auth import add_user

    add_user(service.engine, DEMO_USER, "admin", password)
    try:
        _step(5, total, "pushing the studies over DICOM C-STORE, as a PACS would")
        for s in studies:
            n = push(s, dicom_port, settings.dicom.ae_title)
            print(
                f"           {s.patient_id}: {n}/{len(s.files)} instances stored",
                file=sys.stderr,
                flush=True,
            )
        _step(6, total, "waiting for completion, scoring and delivery of the results")
        deadline = time.monotonic() + 600
        rows: list[StudyRow] = []
        while time.monotonic() < deadline:
            with Session(service.engine) as db:
                rows = list_studies(db)
            if len(rows) == len(studies) and all(r.state in TERMINAL for r in rows):
                break
            time.sleep(0.5)
        _step(7, total, "the worklist, in reading order (urgent first):")
        probability = _probabilities(service)
        _print_worklist(rows, truth, probability)
        positives = sum(truth.values())
        top = [truth.get(r.study_instance_uid, False) for r in rows[:positives]]
        clear_flagged = sum(r.flag for r in rows if not truth.get(r.study_instance_uid))
        lesion_p = [probability.get(u, 0.0) for u, t in truth.items() if t]
        clear_p = [probability.get(u, 1.0) for u, t in truth.items() if not t]
        separated = bool(lesion_p and clear_p and min(lesion_p) > max(clear_p))
        results = sorted(p.name for p in (workdir / "pacs").rglob("*.dcm"))
        print(
            f"  result objects received by the local PACS: {len(results)} in {workdir / 'pacs'}",
            flush=True,
        )
        print(
            f"  web worklist: http://127.0.0.1:{web_port}/  (user {DEMO_USER}, "
            f"password {password})",
            flush=True,
        )
        ok = all(r.state == "DELIVERED" for r in rows) and all(top)
        print(
            f"  {'OK' if ok else 'NOT OK'}: {sum(top)}/{positives} studies with lesions lead "
            "the worklist",
            flush=True,
        )
        print(
            f"  clear studies flagged: {clear_flagged}/{len(truth) - positives}; every lesion "
            f"study above every clear study: {'yes' if separated else 'no'}",
            flush=True,
        )
        if keep_running is None:
            keep_running = sys.stdout.isatty()
        if keep_running:
            print("  the daemon keeps running for the web page; Ctrl-C stops it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
        return 0 if ok else 1
    finally:
        service.stop()
        receiver.stop()
