"""`triaged validate --fit` round trip: fit -> new version -> promote -> scoring follows the
card's decision -> rollback -> the old behaviour, with tiny models on synthetic studies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.conftest import write_config
from tests.pipeline.conftest import TEST_PIPELINE, register_fusion
from triaged.registry import ModelStore
from triaged.synthetic import generate_study

N = 6
LEVELS = {
    "levels": [
        {"operating_point": "urgent", "min_probability": 0.8, "priority": 100, "flag": True},
        {"operating_point": "review", "min_probability": 0.5, "priority": 50},
    ]
}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triaged.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with fusion:v1 live, a pipeline naming operating points, N studies."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fit")
    register_fusion(ModelStore(root / "models"), seed=0)
    pipeline = write_config(
        root / "pipeline.toml",
        {
            **{k: v for k, v in TEST_PIPELINE.items() if k != "models"},
            "models": [{"role": "fusion", "name": "fusion", "batch_size": 4}],
            "model_store": str(root / "models"),
            "priority": LEVELS,
        },
    )
    write_config(
        root / "config.toml",
        {
            "pipelines": [str(pipeline)],
            "database": {"url": f"sqlite:///{root / 'worklist.db'}"},
            "storage": {"spool_dir": str(root / "spool")},
            "worker": {"torch_threads": 1},
        },
    )
    for i in range(N):
        generate_study(
            root / "studies" / f"s{i}", seed=70 + i, positive=i % 2 == 0, slices=10, size=64
        )
    return root


def _score(site: Path) -> dict[str, dict[str, object]]:
    res = _cli(
        "score",
        "--json",
        "--config",
        str(site / "config.toml"),
        *[str(site / "studies" / f"s{i}") for i in range(N)],
    )
    assert res.returncode == 0, res.stderr
    return {e["study_instance_uid"]: e for e in json.loads(res.stdout)}


def _folders(site: Path) -> dict[str, str]:
    """Study Instance UID -> its folder, relative to the site (as labels.csv names it)."""
    out = {}
    for i in range(N):
        first = next((site / "studies" / f"s{i}").rglob("*.dcm"))
        out[str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)] = f"studies/s{i}"
    return out


def test_fit_promote_score_rollback(site: Path) -> None:
    before = _score(site)
    assert all(e["calibrated_on"] is None for e in before.values())
    assert all(e["fusion_probability"] == e["raw_probability"] for e in before.values())
    # labels that the untrained tiny model ranks (the machinery is under test, not the model):
    # the three highest-scoring studies are "positive"
    by_uid = _folders(site)
    ranked = sorted(before, key=lambda u: before[u]["fusion_probability"])  # type: ignore
    labels = {by_uid[u]: int(n >= N // 2) for n, u in enumerate(ranked)}
    (site / "labels.csv").write_text(
        "study,label,patient\n" + "".join(f"{s},{y},P{s[-1]}\n" for s, y in labels.items())
    )

    fitted = _cli(
        "validate",
        "--config",
        str(site / "config.toml"),
        "--labels",
        str(site / "labels.csv"),
        "--fit",
    )
    assert fitted.returncode == 0, fitted.stderr
    assert "registered fusion:v2" in fitted.stdout
    assert "fitted on 6 studies (6 patients, 3 positive) scored by fusion:v1" in fitted.stdout
    store = ModelStore(site / "models")
    v1, v2 = store.get("fusion", "v1"), store.get("fusion", "v2")
    assert store.live("fusion").version == "v1"  # type: ignore[union-attr]
    assert v2.card.weights_sha256 == v1.card.weights_sha256
    decision = v2.card.study_decision
    assert decision is not None and v1.card.study_decision is None
    assert decision.fitted_on.n_studies == N and decision.fitted_on.model == "fusion:v1"

    listed = _cli("models", "--config", str(site / "config.toml"), "list").stdout
    assert "fusion:v2" in listed and "study decision fitted on 6 studies" in listed
    assert (
        _cli("models", "--config", str(site / "config.toml"), "promote", "fusion:v2").returncode
        == 0
    )
    after = _score(site)
    thresholds = {op.name: op.threshold for op in decision.operating_points}
    for e in after.values():
        slices = np.asarray([s["fusion"] for s in e["slices"]])  # type: ignore[union-attr]
        calibrated, raw = decision.probability(slices)
        assert e["fusion_probability"] == pytest.approx(calibrated)
        assert e["raw_probability"] == pytest.approx(raw)
        assert e["calibrated_on"] == N and e["model"]["version"] == "v2"  # type: ignore[index]
        p = float(e["fusion_probability"])  # type: ignore[arg-type]
        fired = (
            "urgent"
            if p >= thresholds["urgent"]
            else "review"
            if p >= thresholds["review"]
            else None
        )
        assert e["operating_point"] == fired
        assert e["priority"] == {"urgent": 100, "review": 50, None: 0}[fired]
        assert e["flag"] == (fired == "urgent")
    # the fitted operating points separate the labelled studies as fitted
    positives = set(ranked[N // 2 :])
    assert all(after[u]["operating_point"] is not None for u in positives)

    assert (
        _cli("models", "--config", str(site / "config.toml"), "rollback", "fusion").returncode == 0
    )
    again = _score(site)
    for uid, e in again.items():
        assert e["calibrated_on"] is None and e["operating_point"] is None
        assert e["fusion_probability"] == pytest.approx(before[uid]["fusion_probability"])
        assert e["priority"] == before[uid]["priority"]


def test_fit_refuses_labels_of_one_class(site: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "study,label\n" + "".join(f"{site / 'studies' / f's{i}'},0\n" for i in range(2))
    )
    res = _cli("validate", "--config", str(site / "config.toml"), "--labels", str(labels), "--fit")
    assert res.returncode == 2
    assert "positive and negative" in res.stderr
