"""Out of distribution: the fit, the flag it withholds, where the reason shows, the model store.

The tiny test models and synthetic studies stand in for a trained model and its data: the
fit is made on four synthetic studies given as a DICOM manifest (``manifest:CSV``, as
``triaged retrain`` would get them), an unlike study is a synthetic study whose axial pixels
were replaced by noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from tests.conftest import write_config
from tests.pipeline.conftest import TEST_PIPELINE, make_pipeline, register_cbam, register_fusion
from triaged.pipeline import ood
from triaged.pipeline.definition import PrioritySection
from triaged.pipeline.models import load_models
from triaged.pipeline.priority import prioritise
from triaged.pipeline.scoring import StudyScore, score_study
from triaged.processing import sr_text, write_results
from triaged.registry import ModelStore
from triaged.synthetic import SyntheticStudy, generate_study

#: flags every study on its score (min_probability 0), so withholding the flag is visible
FLAG_ALL = {"levels": [{"min_probability": 0.0, "priority": 100, "flag": True}], "default": 7}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triaged.cli", *args], capture_output=True, text=True, timeout=600
    )


def noisy_copy(study: SyntheticStudy, dst: Path, seed: int = 0) -> list[Path]:
    """The study's axial series with every pixel replaced by uniform noise over -1000..400 HU
    (lung still "found", so the study is scored, but it looks like nothing the model saw)."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for src in study.series_of_kind("axial").paths:
        ds = pydicom.dcmread(src)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        hu = rng.uniform(-1000.0, 400.0, size=(ds.Rows, ds.Columns))
        ds.PixelData = np.round((hu - intercept) / slope).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(dst / Path(src).name)
        out.append(dst / Path(src).name)
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training data as a hospital would give it: four synthetic studies in a manifest."""
    root = tmp_path_factory.mktemp("train")
    rows = ["path,label,split"]
    for seed in range(1, 5):
        generate_study(root / f"s{seed}", seed=seed, positive=seed % 2 == 0, slices=24, size=64)
        rows.append(f"s{seed}/axial/,{'covid' if seed % 2 == 0 else 'non-covid'},train")
    path = root / "manifest.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, manifest: Path) -> Path:
    """A store: fusion v1 (no fit), v2 = v1 + OOD fit by ``triaged models fit-ood`` (live)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    store = ModelStore(root)
    register_fusion(store, seed=0)
    register_cbam(store)
    out = cli(
        "models", "fit-ood", "fusion:v1", "--data", f"manifest:{manifest}", "--store", str(root)
    )
    assert out.returncode == 0, out.stderr
    assert "registered fusion:v2" in out.stdout
    out = cli("models", "promote", "fusion:v2", "--store", str(root))
    assert out.returncode == 0, out.stderr
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("studies")
    like = generate_study(root / "like", seed=5, positive=True, slices=24, size=64)
    other = generate_study(root / "unlike-src", seed=6, positive=False, slices=24, size=64)
    return {
        "like": list(like.series_of_kind("axial").paths),
        "unlike": noisy_copy(other, root / "unlike"),
    }


def test_fit_flags_far_vectors_and_not_the_training_ones() -> None:
    rng = np.random.default_rng(0)
    scale = np.linspace(0.2, 3.0, 20)
    train = rng.normal(size=(300, 20)) * scale
    fit = ood.fit(train)
    assert fit.threshold > 0
    assert ood.assess(fit, train).distance_share <= 0.02
    new = rng.normal(size=(200, 20)) * scale  # same distribution, unseen
    assert ood.assess(fit, new).distance_share < 0.1
    assert not ood.assess(fit, new).out_of_distribution
    far = rng.normal(size=(10, 20)) * scale + 6.0 * scale
    far_result = ood.assess(fit, far)
    assert far_result.slices_beyond == 10 and far_result.out_of_distribution
    assert far_result.reason == "out of distribution: 10 of 10 slices unlike the training data"
    with pytest.raises(ood.OodError):
        ood.fit(train[:5])


def test_withheld_flag_drops_to_the_highest_unflagged_level() -> None:
    section = PrioritySection()  # 0.8 -> 100 flagged, 0.5 -> 50, else 0; STAT +150
    p = prioritise(0.9, section, None)
    assert (p.priority, p.flag) == (100, True)
    w = ood.withhold_flag(p, 0.9, section)
    assert (w.priority, w.flag, w.positive) == (50, False, True)
    stat = ood.withhold_flag(prioritise(0.9, section, "STAT"), 0.9, section)
    assert (stat.priority, stat.flag, stat.requested) == (200, False, "STAT")
    low = ood.withhold_flag(prioritise(0.3, section, None), 0.3, section)
    assert (low.priority, low.flag) == (0, False)
    only_flag = PrioritySection.model_validate(FLAG_ALL)
    assert ood.withhold_flag(prioritise(0.9, only_flag, None), 0.9, only_flag).priority == 7


def test_unlike_study_is_scored_not_flagged_and_says_why(
    fitted: Path, studies: dict[str, list[Path]], tmp_path: Path
) -> None:
    pipeline = make_pipeline(priority=FLAG_ALL)
    models = load_models(pipeline, ModelStore(fitted))
    fusion = models.fusion
    assert fusion is not None and fusion.version.version == "v2" and fusion.ood is not None

    like = score_study(studies["like"], pipeline, models)
    assert isinstance(like, StudyScore) and like.ood is not None
    assert like.ood_reason is None and like.ood.distance_share <= 0.5
    assert like.flag and like.priority == 100
    assert like.to_dict()["ood"]["reason"] is None

    unlike = score_study(studies["unlike"], pipeline, models)
    assert isinstance(unlike, StudyScore) and unlike.ood is not None
    n = len(unlike.slice_indices)
    assert unlike.ood.slices == n and unlike.ood.slices_beyond > n // 2
    beyond = unlike.ood.slices_beyond
    reason = f"out of distribution: {beyond} of {n} slices unlike the training data"
    assert unlike.ood_reason == reason
    assert 0.0 <= unlike.fusion_probability <= 1.0  # the score is kept
    assert not unlike.flag and unlike.priority == 7
    summary = unlike.to_dict()["ood"]
    assert summary["reason"] == reason and summary["distance_share"] == pytest.approx(
        unlike.ood.slices_beyond / n
    )
    assert any(reason in line for line in sr_text(unlike))

    files, details, _ = write_results(unlike, tmp_path / "out", "t")
    assert details.summary.ood_reason == reason
    (sr_path,) = [f.path for f in files if f.kind == "SR"]
    sr = pydicom.dcmread(sr_path)
    texts = [
        item
        for item in _walk(sr)
        if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert [t.TextValue for t in texts] == [reason]
    check = subprocess.run(
        ["dciodvfy", "-new", str(sr_path)], capture_output=True, text=True, timeout=60
    )
    errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], check.stderr


def _walk(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += _walk(item)
    return out


def test_score_json_carries_the_reason(
    fitted: Path, studies: dict[str, list[Path]], tmp_path: Path
) -> None:
    pipe = tmp_path / "pipeline.toml"
    write_config(pipe, {**TEST_PIPELINE, "model_store": str(fitted), "priority": FLAG_ALL})
    cfg = write_config(tmp_path / "config.toml", {"pipelines": [str(pipe)]})
    out = cli("score", "--json", "--config", str(cfg), *map(str, studies["unlike"]))
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    assert entry["ood"]["reason"].startswith("out of distribution: ")
    assert entry["flag"] is False and entry["priority"] == 7
    out = cli("score", "--json", "--config", str(cfg), *map(str, studies["like"]))
    (entry,) = json.loads(out.stdout)
    assert entry["ood"]["reason"] is None and entry["flag"] is True


def test_fit_lives_in_its_own_version_and_follows_promote_and_rollback(
    fitted: Path, manifest: Path
) -> None:
    store = ModelStore(fitted)
    v1, v2 = store.get("fusion", "v1"), store.get("fusion", "v2")
    assert v1.card.ood is None and not (v1.path / ood.OOD_FILE).exists()
    assert v2.card.ood is not None and (v2.path / ood.OOD_FILE).is_file()
    assert v2.card.weights_sha256 == v1.card.weights_sha256  # same weights
    assert v2.card.ood.feature == ood.FEATURE and v2.card.ood.data == [f"manifest:{manifest}"]
    fit = ood.load_fit(v2)
    assert fit is not None and fit.threshold == v2.card.ood.threshold
    assert fit.mean.shape == (v2.card.ood.dims,)

    pipeline = make_pipeline()
    fusion = load_models(pipeline, store).fusion
    assert fusion is not None and fusion.ood is not None
    store.rollback("fusion")
    fusion = load_models(pipeline, store).fusion
    assert fusion is not None and fusion.version.version == "v1" and fusion.ood is None
    store.promote("fusion", "v2")


def test_altered_fit_is_refused(fitted: Path, tmp_path: Path) -> None:
    store = ModelStore(fitted)
    v2 = store.get("fusion", "v2")
    copy = ModelStore(tmp_path / "m")
    mv = copy.register(
        "fusion",
        v2.weights_path,
        v2.card,
        files={ood.OOD_FILE: b"x" + (v2.path / ood.OOD_FILE).read_bytes()},
    )
    with pytest.raises(ood.OodError, match="sha256"):
        ood.load_fit(mv)


def test_fit_ood_refuses_a_model_that_is_not_fusion(fitted: Path) -> None:
    out = cli("models", "fit-ood", "cbam-cnn:v1", "--data", "synthetic:20", "--store", str(fitted))
    assert out.returncode != 0 and "fusion" in out.stderr
