"""`triaged validate`: the daemon's scoring path on labelled synthetic studies, tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from tests.conftest import write_config
from tests.pipeline.conftest import TEST_PIPELINE, register_cbam, register_fusion
from triaged.registry import ModelStore
from triaged.synthetic import generate_study


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triaged.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    register_fusion(store, seed=0)
    register_cbam(store)
    return root


def _config(root: Path, store: Path) -> Path:
    pipeline = write_config(root / "pipeline.toml", {**TEST_PIPELINE, "model_store": str(store)})
    return write_config(
        root / "config.toml",
        {
            "pipelines": [str(pipeline)],
            "database": {"url": f"sqlite:///{root / 'worklist.db'}"},
            "storage": {"spool_dir": str(root / "spool")},
            "worker": {"torch_threads": 1},
        },
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Path:
    """Four scored studies (two of one patient) and one the pipeline must skip."""
    root = tmp_path_factory.mktemp("site")
    _config(root, model_store)
    for i in range(4):
        generate_study(
            root / "studies" / f"s{i}", seed=40 + i, positive=i % 2 == 0, slices=10, size=64
        )
    scout = generate_study(
        root / "studies" / "scout-only", seed=60, slices=10, size=64, extra_series=("localizer",)
    )
    shutil.rmtree(scout.series_of_kind("axial").paths[0].parent)
    (root / "labels.csv").write_text(
        "study,label,patient\n"
        "studies/s0,1,P1\n"
        "studies/s1,0,P1\n"
        "studies/s2,1,\n"
        "studies/s3,0,P3\n"
        "studies/scout-only,0,P4\n"
    )
    return root


def test_validate_scores_like_triaged_score_and_writes_the_report(site: Path) -> None:
    out = site / "report"
    res = _cli(
        "validate",
        "--config",
        str(site / "config.toml"),
        "--labels",
        str(site / "labels.csv"),
        "--out",
        str(out),
        "--resamples",
        "200",
    )
    assert res.returncode == 0, res.stderr
    assert "4 of 5 studies scored (1 skipped, 0 failed)" in res.stdout
    report = json.loads((out / "validation.json").read_text())

    folders = [str(site / "studies" / f"s{i}") for i in range(4)]
    scored = _cli("score", "--json", "--config", str(site / "config.toml"), *folders)
    assert scored.returncode == 0, scored.stderr
    by_uid = {s["study_instance_uid"]: s for s in json.loads(scored.stdout)}
    rows = {r["study"]: r for r in report["studies"]}
    for i in range(4):
        row = rows[f"studies/s{i}"]
        offline = by_uid[row["study_instance_uid"]]
        assert row["state"] == "SCORED"
        assert row["probability"] == offline["fusion_probability"]  # the same path, exactly
        assert row["cbam_probability"] == offline["cbam_probability"]
        assert row["priority"] == offline["priority"] and row["flag"] == offline["flag"]
        assert row["models"]["fusion"] == "fusion:v1"

    skipped = rows["studies/scout-only"]
    assert skipped["state"] == "SKIPPED" and "no eligible series" in skipped["reason"]
    assert skipped["probability"] is None
    assert rows["studies/s2"]["patient"] == "study:studies/s2"  # its own patient

    c = report["counts"]
    assert (c["studies"], c["scored"], c["skipped"], c["patients"], c["positives"]) == (
        5,
        4,
        1,
        3,
        2,
    )
    assert report["pipeline"]["ref"] == "test-ct:1"
    assert {m["ref"] for m in report["models"]} == {"fusion:v1", "cbam-cnn:v1"}
    assert all(len(m["weights_sha256"]) == 64 for m in report["models"])
    m = report["metrics"]
    assert m["ece"]["bins"] == 10 and 0.0 <= m["ece"]["value"] <= 1.0
    assert report["bootstrap"] == {
        "unit": "patient",
        "resamples": 200,
        "seed": 0,
        "level": 0.95,
        "method": "percentile",
    }
    names = [p["name"] for p in m["operating_points"]]
    assert names == [
        "priority level 100 (p >= 0.8)",
        "priority level 50 (p >= 0.5)",
        "flag",
        "SR positive (p >= 0.5)",
    ]
    for p in m["operating_points"]:
        assert p["tp"] + p["fn"] == 2 and p["tn"] + p["fp"] == 2
    md = (out / "validation.md").read_text()
    assert "![ROC curve](roc.png)" in md and "![Reliability diagram](reliability.png)" in md
    assert "studies/scout-only | SKIPPED" in md
    assert "P1" not in md  # the readable report names no patient
    for png in ("roc.png", "reliability.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG"
    assert not list(out.glob(".*.tmp"))


def test_validate_finds_a_received_study_by_uid_in_the_database(site: Path) -> None:
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from triaged.worklist import db
    from triaged.worklist.studies import InstanceMeta, record_instance

    study = generate_study(site / "spool" / "received", seed=70, positive=True, slices=10, size=64)
    engine = db.make_engine(f"sqlite:///{site / 'worklist.db'}")
    db.upgrade(engine)
    with Session(engine) as s, s.begin():
        for f in study.files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            meta = InstanceMeta(
                study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                patient_id=ds.PatientID,
                instance_number=int(ds.InstanceNumber),
                modality="CT",
            )
            record_instance(s, meta, str(f), f.stat().st_size, None, now=datetime.now(UTC))
    engine.dispose()
    labels = site / "by-uid.csv"
    labels.write_text(f"study,label\n{study.study_instance_uid},1\nstudies/s1,0\n")
    out = site / "report-uid"
    res = _cli(
        "validate",
        "--config",
        str(site / "config.toml"),
        "--labels",
        str(labels),
        "--out",
        str(out),
        "--resamples",
        "50",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "validation.json").read_text())
    row = report["studies"][0]
    assert row["study_instance_uid"] == study.study_instance_uid and row["state"] == "SCORED"
    offline = _cli(
        "score", "--json", "--config", str(site / "config.toml"), str(site / "spool" / "received")
    )
    (expected,) = json.loads(offline.stdout)
    assert row["probability"] == expected["fusion_probability"]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (None, "no such labels file"),
        ("study,label,patiet\nstudies/s0,1,P\n", "unknown column 'patiet'"),
        ("study,patient\nstudies/s0,P\n", "missing column 'label'"),
        ("study,label\nstudies/s0,yes\n", "label must be 0 or 1"),
        ("study,label\nstudies/nope,1\n", "no such study folder"),
        ("study,label\n1.2.3.4.5,1\n", "has no files in the daemon's database"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    site: Path, tmp_path: Path, labels: str | None, message: str
) -> None:
    path = site / f"bad-{abs(hash(message))}.csv"
    if labels is not None:
        path.write_text(labels)
    res = _cli(
        "validate",
        "--config",
        str(site / "config.toml"),
        "--labels",
        str(path),
        "--out",
        str(tmp_path / "r"),
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("triaged: error:") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_no_live_model_is_a_user_error(tmp_path: Path, site: Path) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    config = _config(tmp_path, empty)
    res = _cli(
        "validate",
        "--config",
        str(config),
        "--labels",
        str(site / "labels.csv"),
        "--out",
        str(tmp_path / "r"),
    )
    assert res.returncode == 2
    assert "no live model" in res.stderr and len(res.stderr.strip().splitlines()) == 1
