"""Latency of one study through the scoring pipeline, stage by stage, at real sizes.

Run ``python bench/study_latency.py`` (about 1-2 minutes on 2 cores). It generates a synthetic
300-slice 512x512 chest CT (``triaged.synthetic``), registers an untrained but real-size
FusionNet (DenseNet169 branches at 224, Inf-Net at 352) and the CBAM CNN (180) in a temporary
model store, loads them with the shipped ``pipelines/covid-ct.toml`` and scores the study
``--repeat`` times with :func:`triaged.pipeline.scoring.score_study`, then builds the SR, SC and
SEG with ``triaged.dicom.results.build_results``. Printed: the median seconds per stage (select,
load, transforms, fusion, cbam, explain, aggregate, results) and the whole path; the target is
under 20 s on 2 cores. BatchNorm statistics are calibrated on phantom slices first, so
activations (and hence heat-map and infection crops) look like a trained network's.

Measured (2 vCPUs shared with other jobs, load average 4-7; medians of 2 runs, seconds):

=========  ======  ====  ==========  ======  ====  =======  =======  =====
threads    select  load  transforms  fusion  cbam  explain  results  total
=========  ======  ====  ==========  ======  ====  =======  =======  =====
1          0.39    0.63  0.17        7.18    0.27  0.69     0.21     9.6
2          0.39    0.51  0.64        38.9    0.93  6.09     0.27     47.8
=========  ======  ====  ==========  ======  ====  =======  =======  =====

On an oversubscribed machine two torch threads are 5x *slower* than one (each OpenMP region
waits for its descheduled partner); on an idle machine two threads should win. Measure with
``--threads`` where the daemon runs and set ``[worker] torch_threads`` accordingly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triaged.dicom.results import build_results
from triaged.nets.calibrate import calibrate_batchnorm
from triaged.nets.cbam import BaselineCNN
from triaged.nets.fusion import FusionNet
from triaged.pipeline.definition import load_pipeline
from triaged.pipeline.models import load_models
from triaged.pipeline.scoring import StudyScore, score_study
from triaged.registry import Architecture, ModelCard, ModelStore, TrainingData
from triaged.synthetic import generate_slices, generate_study
from triaged.training.preprocess import Preprocessing

REPO = Path(__file__).resolve().parents[1]
STAGES = ("select", "load", "transforms", "fusion", "cbam", "explain", "aggregate")


def _card(arch: Architecture, size: int) -> ModelCard:
    return ModelCard(
        architecture=arch,
        data=TrainingData(sources=["none (untrained benchmark model)"], split="none"),
        preprocessing=Preprocessing(size=size).as_card(),
        notes="benchmark only: random weights, BatchNorm calibrated on phantoms",
    )


def register_models(store: ModelStore) -> None:
    """Real-size random models, BatchNorm calibrated, registered and live."""
    torch.manual_seed(0)
    fusion = FusionNet()
    hu, _, _ = generate_slices(4, size=256, seed=0)
    prep = Preprocessing(size=fusion.config.input_size)
    calibrate_batchnorm(fusion, [torch.stack([prep(h, "hu") for h in hu])])
    arch = Architecture(name="fusion", params=asdict(fusion.config))
    mv = store.register("fusion", fusion.state_dict(), _card(arch, fusion.config.input_size))
    store.promote("fusion", mv.version)
    cnn = BaselineCNN(cbam=True)
    arch = Architecture(name="baseline-cnn", params={"cbam": True, "size": cnn.size})
    mv = store.register("cbam-cnn", cnn.state_dict(), _card(arch, cnn.size))
    store.promote("cbam-cnn", mv.version)


def daemon_latency(
    root: Path, study_dir: Path, store_dir: Path, pipeline: Path, threads: int
) -> None:
    """The daemon's own path: completion -> scoring -> SR/SC/SEG -> accepted by a PACS.

    Starts ``Service`` (SCP, scheduler, one in-process worker) on SQLite with the demo's
    storage SCP as the destination, pushes the study over DICOM and reads the recorded
    times: ``completed_at`` (the quiet period has passed after the last instance) to the
    last delivery's ``delivered_at``, with the worker's per-stage timings.
    """
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from triaged.config import from_dict
    from triaged.demo import ResultReceiver, _free_port, push
    from triaged.service import Service
    from triaged.synthetic import SyntheticSeries, SyntheticStudy
    from triaged.worklist.models import Delivery, Result, Study

    pacs_port = _free_port()
    receiver = ResultReceiver(root / "pacs", pacs_port)
    settings = from_dict(
        {
            "pipelines": [str(pipeline)],
            "dicom": {"port": _free_port()},
            "storage": {"spool_dir": "spool", "results_dir": "results", "min_free_mb": 64},
            "database": {"url": "sqlite:///bench.db"},
            "assembly": {"quiet_seconds": 2, "sweep_seconds": 0.25},
            "destinations": [
                {"name": "pacs", "ae_title": "DEMO_PACS", "host": "127.0.0.1", "port": pacs_port}
            ],
            "worker": {"in_process": 1, "poll_seconds": 0.1, "torch_threads": threads},
            "web": {"enabled": False},
            "models": {"store": str(store_dir)},
        },
        root,
        environ={},
    )
    service = Service(settings)
    service.start()
    try:
        files = tuple(sorted(study_dir.rglob("*.dcm")))
        fake = SyntheticStudy(
            "", "", "", True, (SyntheticSeries("", "axial", "", files),), None, None
        )  # type: ignore[arg-type]
        t0 = time.perf_counter()
        push(fake, settings.dicom.port, settings.dicom.ae_title)
        print(f"\ndaemon: {len(files)} instances pushed in {time.perf_counter() - t0:.1f} s")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with Session(service.engine) as s:
                state = s.scalar(select(Study.state))
            if state in ("DELIVERED", "FAILED", "SKIPPED"):
                break
            time.sleep(0.2)
        with Session(service.engine) as s:
            study = s.scalars(select(Study)).one()
            result = s.scalars(select(Result)).one()
            last = max(d.delivered_at for d in s.scalars(select(Delivery)) if d.delivered_at)
        assert study.completed_at is not None and study.scored_at is not None
        print(
            f"daemon: state {study.state}; from completion (quiet period over) to the last "
            f"object accepted by the PACS: {(last - study.completed_at).total_seconds():.1f} s"
        )
        for key, value in result.timings.items():
            print(f"  {key:<11} {value:7.2f}")
        print(
            f"  {'queue+send':<11} "
            f"{(last - study.completed_at).total_seconds() - result.timings['total']:7.2f}"
            "   (claim after completion, commit, C-STORE of SR/SC/SEG)"
        )
    finally:
        service.stop()
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "covid-ct.toml")
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        help="skip the end-to-end run through the daemon and a PACS",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="triaged-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        study = generate_study(
            root / "study",
            seed=7,
            positive=True,
            slices=args.slices,
            size=args.size,
            extra_series=("localizer",),
        )
        t_gen = time.perf_counter() - t0
        store = ModelStore(root / "models")
        t0 = time.perf_counter()
        register_models(store)
        t_reg = time.perf_counter() - t0
        pipeline = load_pipeline(args.pipeline)
        t0 = time.perf_counter()
        models = load_models(pipeline, store)
        t_load = time.perf_counter() - t0

        print(
            f"study: {len(study.files)} files, {args.slices} x {args.size}x{args.size} "
            f"(generated in {t_gen:.1f} s); models registered in {t_reg:.1f} s, "
            f"loaded in {t_load:.1f} s; torch threads {torch.get_num_threads()}"
        )
        print(
            f"pipeline {pipeline.ref}: {pipeline.preprocess.slices} slices, fusion batch "
            f"{pipeline.models[0].batch_size}, fast mode {pipeline.models[0].fast}"
        )
        runs: list[dict[str, float]] = []
        for n in range(args.repeat):
            start = time.perf_counter()
            result = score_study([root / "study"], pipeline, models)
            if not isinstance(result, StudyScore):
                raise SystemExit(f"study skipped: {result.reason}")
            t1 = time.perf_counter()
            objects = build_results(
                list(result.datasets), result.to_findings(), result_key=f"bench-{n}"
            )
            t_results = time.perf_counter() - t1
            timings = {
                **{k: result.timings.get(k, 0.0) for k in STAGES},
                "results": t_results,
                "total": time.perf_counter() - start,
            }
            runs.append(timings)
            stages = "  ".join(f"{k} {v:.2f}" for k, v in timings.items())
            print(
                f"run {n + 1}: {stages}  ({len(objects.datasets())} result objects, "
                f"p={result.fusion_probability:.3f})"
            )
        print("\nmedian seconds per stage")
        for key in (*STAGES, "results", "total"):
            print(f"  {key:<11} {statistics.median(r[key] for r in runs):7.2f}")
        if not args.no_daemon:
            daemon_latency(root, root / "study", root / "models", args.pipeline, args.threads or 1)


if __name__ == "__main__":
    main()
