"""Classification and segmentation metrics, with COVID as the positive class (label 1).

The papers report accuracy, F1 and AUC; the authors' code used label 0 = COVID, we use
1 = COVID everywhere, so F1 is the F1 of the COVID class. Each figure on a few hundred test
images carries a wide sampling error, hence :func:`bootstrap_ci` (seeded, percentile method),
and :func:`report` puts figure and interval side by side for model cards and docs.

AUC is computed from ranks (Mann-Whitney U, ties counted half) because the bootstrap calls it
a thousand times; the tests check it against scikit-learn. The ROC curve itself comes from
scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_curve as _sk_roc_curve

ArrayLike = npt.ArrayLike
Metric = Callable[[np.ndarray, np.ndarray], float]


def _labels(y_true: ArrayLike) -> np.ndarray:
    y = np.asarray(y_true).astype(np.int64).ravel()
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (non-COVID) or 1 (COVID)")
    return y


def predictions(scores: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """COVID (1) where the probability is at or above ``threshold``."""
    return (np.asarray(scores, dtype=np.float64).ravel() >= threshold).astype(np.int64)


def confusion(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """2x2 counts ``[[TN, FP], [FN, TP]]`` (scikit-learn's layout for labels 0, 1)."""
    t, p = _labels(y_true), _labels(y_pred)
    return np.array(
        [
            [np.sum((t == 0) & (p == 0)), np.sum((t == 0) & (p == 1))],
            [np.sum((t == 1) & (p == 0)), np.sum((t == 1) & (p == 1))],
        ],
        dtype=np.int64,
    )


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    t, p = _labels(y_true), _labels(y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """F1 of the COVID class; 0 when there is no true or predicted positive."""
    (_, fp), (fn, tp) = confusion(y_true, y_pred)
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def sensitivity(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    (_, _), (fn, tp) = confusion(y_true, y_pred)
    return float(tp / (tp + fn)) if tp + fn else float("nan")


def specificity(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    (tn, fp), (_, _) = confusion(y_true, y_pred)
    return float(tn / (tn + fp)) if tn + fp else float("nan")


def auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    t = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    u = ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` with COVID as positive."""
    fpr, tpr, thr = _sk_roc_curve(_labels(y_true), np.asarray(scores, dtype=np.float64).ravel())
    return fpr, tpr, thr


def bootstrap_ci(
    metric: Metric,
    y_true: ArrayLike,
    scores: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(y_true, scores)`` over resampled cases.

    Resamples where the metric is undefined (NaN, e.g. AUC with one class) are dropped.
    """
    t = _labels(y_true)
    s = np.asarray(scores).ravel()
    if t.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples, dtype=np.float64)
    for i in range(n_resamples):
        idx = rng.integers(0, t.size, t.size)
        values[i] = metric(t[idx], s[idx])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class ClassificationReport:
    """Figures for one model on one split, each with its bootstrap 95% interval."""

    n: int
    n_covid: int
    threshold: float
    accuracy: float
    accuracy_ci: tuple[float, float]
    f1: float
    f1_ci: tuple[float, float]
    auc: float
    auc_ci: tuple[float, float]
    sensitivity: float
    specificity: float
    confusion: list[list[int]]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def report(
    y_true: ArrayLike,
    scores: ArrayLike,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
) -> ClassificationReport:
    """Accuracy, F1, AUC (+ intervals), sensitivity, specificity and the confusion matrix."""
    t = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64).ravel()
    p = predictions(s, threshold)

    def on_pred(m: Metric) -> Metric:
        return lambda yt, sc: m(yt, predictions(sc, threshold))

    return ClassificationReport(
        n=int(t.size),
        n_covid=int(t.sum()),
        threshold=threshold,
        accuracy=accuracy(t, p),
        accuracy_ci=bootstrap_ci(on_pred(accuracy), t, s, n_resamples, seed),
        f1=f1(t, p),
        f1_ci=bootstrap_ci(on_pred(f1), t, s, n_resamples, seed),
        auc=auc(t, s),
        auc_ci=bootstrap_ci(auc, t, s, n_resamples, seed),
        sensitivity=sensitivity(t, p),
        specificity=specificity(t, p),
        confusion=confusion(t, p).tolist(),
    )


def dice(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, eps: float = 1e-7
) -> float:
    """Dice overlap of two binary masks (any non-zero is foreground); 1.0 when both empty."""
    a = (pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)) != 0
    b = (
        target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    ) != 0
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    inter = float(np.logical_and(a, b).sum())
    total = float(a.sum() + b.sum())
    if total == 0:
        return 1.0
    return (2.0 * inter + eps) / (total + eps)
