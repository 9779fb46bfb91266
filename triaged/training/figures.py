"""Figures of the reproduction report from registered models: ROC + confusion, CAM, t-SNE.

``python -m triaged.training.figures --store runs/store-repro \
--data covid-ct:data/COVID-CT --out docs/figures`` scores the COVID-CT **test**
split (scoring and plotting only: nothing here trains or selects) with the fusion model and
the Rao et al. CNNs and writes small PNGs:

* ``roc_<model>.png`` per model: ROC curve (AUC in the legend; the fusion model's branches
  too) next to the confusion matrix at threshold 0.5; ``roc_compare.png`` all models at once;
* ``cam_<fusion>.png``: the fusion model's CAM (paper Fig. 3) on a few seeded-random test
  slices per class, with P(COVID) in each title (not chosen by how well they look);
* ``tsne_<fusion>.png``: t-SNE of the fusion head's input (the concatenated pooled branch
  features) coloured by the true label;
* ``gradcam_<cnn>.png``: Grad-CAM of the CBAM CNN on the same slices.

COVID-19 (label 1) is the positive class on every figure. matplotlib is a documentation
dependency only: it is imported inside the plotting functions, never by the daemon.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from triaged.pipeline.builders import load_version
from triaged.pipeline.preprocess import Preprocessing
from triaged.registry import ModelStore, ModelVersion, RegistryError
from triaged.training import metrics as M
from triaged.training.datasets import Sample, SliceDataset, covid_ct

log = logging.getLogger("triaged.figures")

POSITIVE = "positive class: COVID"
CLASS_NAMES = ("non-COVID", "COVID")
DPI = 100


@dataclass(frozen=True)
class Scored:
    """One model's output on the evaluated slices (in sample order)."""

    ref: str
    labels: np.ndarray  # (N,) 0/1
    probs: dict[str, np.ndarray]  # output name -> (N,) P(COVID); the first is the model's own
    features: np.ndarray | None = None  # fusion head input (N, 4D), fusion models only

    @property
    def main(self) -> np.ndarray:
        return next(iter(self.probs.values()))


def _batches(samples: Sequence[Sample], prep: Preprocessing, batch: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(SliceDataset(samples, prep, cache=False), batch_size=batch, shuffle=False)


def score_version(mv: ModelVersion, samples: Sequence[Sample], batch: int = 16) -> Scored:
    """P(COVID) of a registered classifier on ``samples``, fed as its card says.

    A fusion model gives its own probability first, then each branch's, plus the pooled
    features that t-SNE embeds (one pass serves all of them).
    """
    model = load_version(mv)
    prep = Preprocessing.from_card(mv.card.preprocessing)
    arch = mv.card.architecture.name
    labels: list[np.ndarray] = []
    probs: dict[str, list[np.ndarray]] = {}
    feats: list[np.ndarray] = []
    with torch.no_grad():
        for b in _batches(samples, prep, batch):
            labels.append(b["label"].numpy())
            for name, p in _forward(model, mv.name, arch, b["image"], feats).items():
                probs.setdefault(name, []).append(p.float().numpy())
    return Scored(
        ref=mv.ref,
        labels=np.concatenate(labels).astype(np.int64),
        probs={k: np.concatenate(v) for k, v in probs.items()},
        features=np.concatenate(feats) if feats else None,
    )


def _forward(
    model: nn.Module, name: str, arch: str, images: torch.Tensor, feats: list[np.ndarray]
) -> dict[str, torch.Tensor]:
    if arch == "fusion":
        from triaged.nets.fusion import FusionNet

        assert isinstance(model, FusionNet)
        f = model.run(images).features()
        feats.append(f.fusion_input().float().numpy())
        lg, lh, li, lf = (torch.sigmoid(t.float()) for t in model.heads(f))
        return {"fusion": lf, "global": lg, "heat-map": lh, "infected": li}
    if arch == "baseline-cnn":
        from triaged.nets.cbam import prob_covid

        return {name: prob_covid(model(images))}
    raise ValueError(f"{arch!r} is not a classifier")


def pick_slices(labels: np.ndarray, per_class: int, seed: int = 0) -> list[int]:
    """``per_class`` seeded-random indices of COVID then non-COVID slices (not cherry-picked)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for cls in (1, 0):
        idx = np.flatnonzero(labels == cls)
        k = min(per_class, idx.size)
        out += sorted(int(i) for i in rng.choice(idx, size=k, replace=False))
    return out


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of feature rows ``(N, D) -> (N, 2)``, after PCA to at most 50 dimensions
    (the usual noise-reducing step; it also keeps t-SNE fast on 5,120-wide fusion features)."""
    from sklearn.decomposition import PCA  # type: ignore[import-untyped]
    from sklearn.manifold import TSNE  # type: ignore[import-untyped]

    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 4:
        raise ValueError("t-SNE needs at least 4 points")
    k = min(50, n - 1, x.shape[1])
    x = PCA(n_components=k, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64)


# ---------------------------------------------------------------------------- plotting
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, dpi: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def _roc_panel(ax: Any, labels: np.ndarray, curves: Mapping[str, np.ndarray]) -> None:
    for i, (name, p) in enumerate(curves.items()):
        fpr, tpr, _ = M.roc_curve(labels, p)
        ax.plot(
            fpr,
            tpr,
            lw=2.2 if i == 0 else 1.1,
            alpha=1.0 if i == 0 else 0.75,
            label=f"{name} (AUC {M.auc(labels, p):.3f})",
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1, label="chance")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        aspect="equal",
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def _confusion_panel(ax: Any, labels: np.ndarray, probs: np.ndarray, threshold: float) -> None:
    cm = M.confusion(labels, M.predictions(probs, threshold))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    for (r, c), v in np.ndenumerate(cm):
        ax.text(
            c,
            r,
            str(v),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if v > cm.max() / 2 else "black",
        )
    ax.set_xticks([0, 1], [f"pred. {n}" for n in CLASS_NAMES])
    ax.set_yticks([0, 1], [f"true {n}" for n in CLASS_NAMES], rotation=90, va="center")
    acc = M.accuracy(labels, M.predictions(probs, threshold))
    f1 = M.f1(labels, M.predictions(probs, threshold))
    ax.set_title(
        f"confusion at P(COVID) >= {threshold:g}\naccuracy {acc:.3f}, F1 {f1:.3f}", fontsize=10
    )


def plot_roc_confusion(
    scored: Scored, out: Path, split: str = "test", threshold: float = 0.5, dpi: int = DPI
) -> Path:
    """ROC (every output of the model) and the confusion matrix of its own output."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.6), width_ratios=(1.25, 1))
    _roc_panel(a, scored.labels, scored.probs)
    a.set_title("ROC", fontsize=10)
    _confusion_panel(b, scored.labels, scored.main, threshold)
    fig.suptitle(f"{scored.ref} on {_split_text(scored.labels, split)}", fontsize=11)
    return _save(fig, out, dpi)


def plot_roc_compare(
    scored: Sequence[Scored], out: Path, split: str = "test", dpi: int = DPI
) -> Path:
    """The models' own ROC curves on one axis (they must share slices)."""
    plt = _pyplot()
    labels = scored[0].labels
    for s in scored[1:]:
        if not np.array_equal(s.labels, labels):
            raise ValueError(f"{s.ref} was scored on other slices than {scored[0].ref}")
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    _roc_panel(ax, labels, {s.ref: s.main for s in scored})
    ax.set_title(f"ROC on {_split_text(labels, split)}", fontsize=10)
    return _save(fig, out, dpi)


def _split_text(labels: np.ndarray, split: str) -> str:
    n, pos = labels.size, int(labels.sum())
    return f"COVID-CT {split} split ({n} slices: {pos} COVID, {n - pos} non-COVID); {POSITIVE}"


def plot_overlays(
    images: np.ndarray,
    maps: np.ndarray,
    labels: Sequence[int],
    probs: Sequence[float],
    title: str,
    out: Path,
    dpi: int = DPI,
) -> Path:
    """Slices ``(K, H, W)`` in grey, their ``[0, 1]`` evidence maps on top (opacity grows with
    the evidence, so the anatomy stays readable), one row per true class, each titled with the
    true class and the model's P(COVID)."""
    plt = _pyplot()
    rows = [[i for i, y in enumerate(labels) if y == cls] for cls in (1, 0)]
    rows = [r for r in rows if r]
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.9 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("jet")
    for r, idx in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(idx):
                continue
            i = idx[c]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
            rgba = cmap(np.clip(maps[i], 0.0, 1.0))
            rgba[..., 3] = 0.6 * np.clip(maps[i], 0.0, 1.0)  # no evidence: plain grey slice
            ax.imshow(rgba)
            ax.set_title(f"true {CLASS_NAMES[labels[i]]}\nP(COVID) = {probs[i]:.2f}", fontsize=9)
    from matplotlib.cm import ScalarMappable

    fig.colorbar(
        ScalarMappable(cmap=cmap),
        ax=axes,
        shrink=0.7,
        label="evidence for COVID (per-slice max = 1)",
    )
    fig.suptitle(title, fontsize=10)
    return _save(fig, out, dpi)


def plot_tsne(
    embedding: np.ndarray, labels: np.ndarray, title: str, out: Path, dpi: int = DPI
) -> Path:
    """The 2-D embedding, one colour per true class."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for cls, colour in ((0, "tab:blue"), (1, "tab:red")):
        pts = embedding[labels == cls]
        ax.scatter(
            pts[:, 0],
            pts[:, 1],
            s=14,
            c=colour,
            alpha=0.75,
            label=f"{CLASS_NAMES[cls]} ({len(pts)})",
        )
    ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
    ax.legend(title="true label", fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, out, dpi)


# ---------------------------------------------------------------------------- explanations
def _stack(samples: Sequence[Sample], prep: Preprocessing) -> torch.Tensor:
    ds = SliceDataset(samples, prep, cache=False)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def cam_figure(
    mv: ModelVersion, samples: Sequence[Sample], out: Path, split: str = "test", dpi: int = DPI
) -> Path:
    """CAM overlays of a fusion model (paper Fig. 3) or Grad-CAM of a CNN on ``samples``."""
    from triaged.nets.cbam import BaselineCNN, prob_covid
    from triaged.nets.explain import fusion_cam, gradcam_cnn
    from triaged.nets.fusion import FusionNet

    model = load_version(mv)
    images = _stack(samples, Preprocessing.from_card(mv.card.preprocessing))
    if isinstance(model, FusionNet):
        maps = fusion_cam(model, images)
        with torch.no_grad():
            probs = model(images).p_fusion.numpy()
        kind = "fusion CAM (all branches, pasted into the slice)"
    elif isinstance(model, BaselineCNN):
        maps = gradcam_cnn(model, images)
        with torch.no_grad():
            probs = prob_covid(model(images)).numpy()
        kind = "Grad-CAM of the last conv block"
    else:
        raise ValueError(f"{mv.ref}: no explanation for {type(model).__name__}")
    labels = [int(s.label or 0) for s in samples]
    title = (
        f"{mv.ref}: {kind}\nCOVID-CT {split} slices (seeded random, not chosen by "
        f"result); {POSITIVE}"
    )
    return plot_overlays(
        images[:, 0].numpy(), maps, labels, [float(p) for p in probs], title, out, dpi
    )


# ---------------------------------------------------------------------------- all of it
@dataclass(frozen=True)
class FigureSpec:
    """Which registered versions to draw (``name:version``; ``name:live`` allowed)."""

    fusion: str | None = "fusion:v1"
    cnns: tuple[str, ...] = ("cbam-cnn:v1", "plain-cnn:v1")
    gradcam: str | None = "cbam-cnn:v1"
    per_class: int = 3
    seed: int = 0
    dpi: int = DPI


def _slug(ref: str) -> str:
    return ref.replace(":", "-")


def make_figures(
    store: ModelStore,
    samples: Sequence[Sample],
    out: Path,
    spec: FigureSpec = FigureSpec(),
    split: str = "test",
) -> list[Path]:
    """Every figure of the module for ``samples``; returns the PNGs written."""
    written: list[Path] = []
    scored: list[Scored] = []
    refs = ([spec.fusion] if spec.fusion else []) + list(spec.cnns)
    for ref in refs:
        t0 = time.perf_counter()
        s = score_version(store.resolve(ref), samples)
        scored.append(s)
        written.append(plot_roc_confusion(s, out / f"roc_{_slug(s.ref)}.png", split, dpi=spec.dpi))
        log.info("%s scored and plotted in %.1f s", s.ref, time.perf_counter() - t0)
    if len(scored) > 1:
        written.append(plot_roc_compare(scored, out / "roc_compare.png", split, spec.dpi))
    labels = np.array([int(s.label or 0) for s in samples])
    chosen = [samples[i] for i in pick_slices(labels, spec.per_class, spec.seed)]
    if spec.fusion:
        fusion = scored[0]
        assert fusion.features is not None
        t0 = time.perf_counter()
        emb = tsne_embedding(fusion.features, spec.seed)
        title = (
            f"{fusion.ref}: t-SNE of the fusion head input (pooled features of all "
            f"branches)\n{_split_text(fusion.labels, split)}"
        )
        written.append(
            plot_tsne(emb, fusion.labels, title, out / f"tsne_{_slug(fusion.ref)}.png", spec.dpi)
        )
        written.append(
            cam_figure(
                store.resolve(spec.fusion),
                chosen,
                out / f"cam_{_slug(fusion.ref)}.png",
                split,
                spec.dpi,
            )
        )
        log.info("t-SNE and CAM in %.1f s", time.perf_counter() - t0)
    if spec.gradcam:
        mv = store.resolve(spec.gradcam)
        written.append(
            cam_figure(mv, chosen, out / f"gradcam_{_slug(mv.ref)}.png", split, spec.dpi)
        )
    return written


def _test_split(data: str) -> list[Sample]:
    kind, _, path = data.partition(":")
    if kind != "covid-ct" or not path:
        raise ValueError(f"--data {data!r}: expected covid-ct:PATH")
    return covid_ct(path)["test"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m triaged.training.figures",
        description="Figures of the reproduction report (test split).",
    )
    p.add_argument("--store", type=Path, required=True, help="model store")
    p.add_argument("--data", required=True, help="covid-ct:PATH (its test split is plotted)")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--fusion", default="fusion:v1", help="fusion version ('' for none)")
    p.add_argument(
        "--cnn",
        action="append",
        default=None,
        help="CNN version, repeatable (default cbam-cnn:v1 and plain-cnn:v1)",
    )
    p.add_argument("--gradcam", default="cbam-cnn:v1", help="CNN for Grad-CAM ('' for none)")
    p.add_argument("--per-class", type=int, default=3, help="CAM slices per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dpi", type=int, default=DPI)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    spec = FigureSpec(
        fusion=args.fusion or None,
        cnns=tuple(args.cnn) if args.cnn is not None else FigureSpec.cnns,
        gradcam=args.gradcam or None,
        per_class=args.per_class,
        seed=args.seed,
        dpi=args.dpi,
    )
    t0 = time.perf_counter()
    try:
        samples = _test_split(args.data)
        paths = make_figures(ModelStore(args.store), samples, args.out, spec)
    except (ValueError, FileNotFoundError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    log.info("%d figures in %.0f s", len(paths), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
