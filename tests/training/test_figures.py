"""The report figures on tiny models and a tiny COVID-CT-shaped folder of phantom slices."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from triaged.nets.calibrate import calibrate_batchnorm
from triaged.nets.cbam import BaselineCNN
from triaged.nets.fusion import FusionNet
from triaged.registry import Architecture, ModelCard, ModelStore, TrainingData
from triaged.synthetic import generate_slices
from triaged.training import figures as F
from triaged.training.datasets import covid_ct
from triaged.training.preprocess import Preprocessing

SIZE = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _card(arch: Architecture) -> ModelCard:
    return ModelCard(
        architecture=arch,
        data=TrainingData(sources=["synthetic phantoms"], split="none (test)"),
        preprocessing=Preprocessing(size=SIZE).as_card(),
        seed=0,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COVID-CT layout (folders + Data-split lists) of 8-bit phantom PNGs: 6 + 6 test."""
    root = tmp_path_factory.mktemp("covid-ct")
    hu, labels, _ = generate_slices(16, size=64, seed=3)
    grey = np.clip((hu + 1350.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
    lists: dict[tuple[str, str], list[str]] = {}
    for i, (img, y) in enumerate(zip(grey, labels, strict=True)):
        cls = "COVID" if y == 1 else "NonCOVID"
        folder = root / f"CT_{cls}"
        folder.mkdir(exist_ok=True)
        name = f"slice {i}%.png"  # the real names contain spaces and %
        Image.fromarray(img).save(folder / name)
        split = "train" if i < 4 else "test"
        lists.setdefault((cls, split), []).append(name)
    for cls in ("COVID", "NonCOVID"):
        (root / "Data-split" / cls).mkdir(parents=True)
        for split in ("train", "val", "test"):
            (root / "Data-split" / cls / f"{split}CT_{cls}.txt").write_text(
                "\n".join(lists.get((cls, split), [])) + "\n", encoding="utf-8"
            )
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, data: Path) -> ModelStore:
    """fusion:v1 (Lite0 at 32 px, BatchNorm calibrated) and cbam-cnn:v1 / plain-cnn:v1."""
    torch.set_num_threads(1)
    s = ModelStore(tmp_path_factory.mktemp("models"))
    torch.manual_seed(0)
    net = FusionNet(backbone="efficientnet-lite0", input_size=SIZE, infnet_size=SIZE)
    hu, _, _ = generate_slices(6, size=64, seed=1)
    prep = Preprocessing(size=SIZE)
    calibrate_batchnorm(net, [torch.stack([prep(h, "hu") for h in hu])])
    s.register(
        "fusion", net.state_dict(), _card(Architecture(name="fusion", params=asdict(net.config)))
    )
    for name, cbam in (("cbam-cnn", True), ("plain-cnn", False)):
        cnn = BaselineCNN(cbam=cbam, size=SIZE)
        s.register(
            name,
            cnn.state_dict(),
            _card(Architecture(name="baseline-cnn", params={"cbam": cbam, "size": SIZE})),
        )
    return s


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_cli_writes_every_figure(store: ModelStore, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    status = F.main(
        [
            "--store",
            str(store.root),
            "--data",
            f"covid-ct:{data}",
            "--out",
            str(out),
            "--per-class",
            "2",
            "--dpi",
            "40",
        ]
    )
    assert status == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "roc_fusion-v1.png",
        "roc_cbam-cnn-v1.png",
        "roc_plain-cnn-v1.png",
        "roc_compare.png",
        "tsne_fusion-v1.png",
        "cam_fusion-v1.png",
        "gradcam_cbam-cnn-v1.png",
    }
    assert all(_is_png(out / n) for n in names)


def test_fusion_scores_and_tsne_have_one_row_per_slice(store: ModelStore, data: Path) -> None:
    test = covid_ct(data)["test"]
    scored = F.score_version(store.get("fusion", "v1"), test)
    n = len(test)
    assert list(scored.probs) == ["fusion", "global", "heat-map", "infected"]
    assert all(p.shape == (n,) and np.all((p >= 0) & (p <= 1)) for p in scored.probs.values())
    assert scored.labels.tolist() == [s.label for s in test]
    assert scored.features is not None
    assert scored.features.shape == (n, 4 * 1280)  # Lite0: 1,280 per pooled branch feature
    emb = F.tsne_embedding(scored.features)
    assert emb.shape == (n, 2) and np.isfinite(emb).all()


def test_cnn_scores_and_overlays(store: ModelStore, data: Path, tmp_path: Path) -> None:
    test = covid_ct(data)["test"]
    scored = F.score_version(store.get("cbam-cnn", "v1"), test)
    assert list(scored.probs) == ["cbam-cnn"] and scored.main.shape == (len(test),)
    roc = F.plot_roc_confusion(scored, tmp_path / "roc.png", dpi=40)
    assert _is_png(roc)
    idx = F.pick_slices(scored.labels, 2)
    cam = F.cam_figure(
        store.get("cbam-cnn", "v1"), [test[i] for i in idx], tmp_path / "cam.png", dpi=40
    )
    assert _is_png(cam)


def test_pick_slices_is_seeded_and_by_class() -> None:
    labels = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1])
    a = F.pick_slices(labels, 2, seed=5)
    assert a == F.pick_slices(labels, 2, seed=5)
    assert [int(labels[i]) for i in a] == [1, 1, 0, 0]
    assert len(F.pick_slices(labels, 10)) == labels.size  # capped by what exists


def test_compare_refuses_different_slices(tmp_path: Path) -> None:
    a = F.Scored("a:v1", np.array([0, 1, 0, 1]), {"x": np.array([0.1, 0.9, 0.2, 0.8])})
    b = F.Scored("b:v1", np.array([1, 1, 0, 0]), {"x": np.array([0.1, 0.9, 0.2, 0.8])})
    with pytest.raises(ValueError, match="other slices"):
        F.plot_roc_compare([a, b], tmp_path / "c.png")


def test_bad_data_spec_is_a_user_error(
    store: ModelStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = F.main(
        ["--store", str(store.root), "--data", "semiseg:/nowhere", "--out", str(tmp_path)]
    )
    assert status == 2
    assert "covid-ct:PATH" in capsys.readouterr().err
