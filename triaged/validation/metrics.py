"""Study-level metrics with patient-level bootstrap intervals, and calibration (ECE).

Why patient-level: a site's labelled set often holds several studies of one patient
(follow-ups). They are correlated, so the bootstrap resamples *patients* with replacement and
takes all studies of each drawn patient; a study without a patient is its own patient.
Every statistic of one report is computed on the same resamples (seeded), so the intervals
are reproducible and mutually consistent. Resamples where a statistic is undefined (AUC or
sensitivity without a positive study, specificity without a negative one) are dropped for
that statistic; ``defined`` says how many were kept.

Expected calibration error (ECE): the probabilities are put into ``bins`` equal-width bins
on [0, 1] (bin ``b`` holds ``b/bins <= p < (b+1)/bins``, computed as ``floor(p * bins)``;
p = 1 goes to the last bin); ECE = sum over bins of ``n_b / N * |observed_b - mean_p_b|``,
where ``observed_b`` is the fraction of positive studies in the bin and ``mean_p_b`` the mean
predicted probability there. 0 is perfect calibration; empty bins contribute nothing.

AUC, sensitivity and specificity are those of :mod:`triaged.training.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from triaged.training import metrics as M

Statistic = Callable[[np.ndarray, np.ndarray], float]

N_RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
BINS = 10


def patient_resamples(
    groups: Sequence[str], n_resamples: int = N_RESAMPLES, seed: int = SEED
) -> Iterator[np.ndarray]:
    """Row indices of each bootstrap resample: as many patients as there are, drawn with
    replacement, each bringing all of its rows (in their original order)."""
    keys = np.asarray([str(g) for g in groups], dtype=str)
    if keys.size == 0:
        return
    patients, inverse = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(patients.size)]
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        picks = rng.integers(0, patients.size, patients.size)
        yield np.concatenate([members[p] for p in picks])


@dataclass(frozen=True)
class Estimate:
    """A statistic on all studies with its patient-bootstrap percentile interval."""

    value: float
    ci: tuple[float, float]
    defined: int  # resamples where the statistic was defined

    def as_dict(self) -> dict[str, object]:
        return {
            "value": _finite(self.value),
            "ci": [_finite(self.ci[0]), _finite(self.ci[1])],
            "defined_resamples": self.defined,
        }


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined figure is null."""
    return None if not np.isfinite(x) else float(x)


def patient_bootstrap(
    statistics: Mapping[str, Statistic],
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    groups: Sequence[str],
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, Estimate]:
    """Each statistic on all rows, with its interval over the same patient resamples."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not (y.size == s.size == len(groups)):
        raise ValueError("labels, scores and groups differ in length")
    values: dict[str, list[float]] = {name: [] for name in statistics}
    for idx in patient_resamples(groups, n_resamples, seed):
        for name, stat in statistics.items():
            values[name].append(stat(y[idx], s[idx]))
    alpha = (1.0 - level) / 2.0
    out: dict[str, Estimate] = {}
    for name, stat in statistics.items():
        point = stat(y, s) if y.size else float("nan")
        kept = np.asarray(values[name], dtype=np.float64)
        kept = kept[np.isfinite(kept)]
        if kept.size:
            lo, hi = np.quantile(kept, [alpha, 1.0 - alpha])
            ci = (float(lo), float(hi))
        else:
            ci = (float("nan"), float("nan"))
        out[name] = Estimate(float(point), ci, int(kept.size))
    return out


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of the reliability diagram."""

    low: float
    high: float
    count: int
    mean_probability: float  # NaN when empty
    observed: float  # fraction of positives, NaN when empty

    def as_dict(self) -> dict[str, object]:
        return {
            "low": self.low,
            "high": self.high,
            "count": self.count,
            "mean_probability": _finite(self.mean_probability),
            "observed": _finite(self.observed),
        }


def reliability(
    y_true: npt.ArrayLike, probabilities: npt.ArrayLike, bins: int = BINS
) -> list[ReliabilityBin]:
    """The equal-width bins of the reliability diagram (see the module docstring)."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    index = _bin_index(p, bins)
    out = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        out.append(
            ReliabilityBin(
                low=b / bins,
                high=(b + 1) / bins,
                count=n,
                mean_probability=float(p[inside].mean()) if n else float("nan"),
                observed=float(y[inside].mean()) if n else float("nan"),
            )
        )
    return out


def ece(y_true: npt.ArrayLike, probabilities: npt.ArrayLike, bins: int = BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins; NaN without studies."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    return float(
        sum(
            b.count / p.size * abs(b.observed - b.mean_probability)
            for b in reliability(y_true, p, bins)
            if b.count
        )
    )


def at_threshold(metric: Callable[[np.ndarray, np.ndarray], float], threshold: float) -> Statistic:
    """``metric(labels, predicted)`` where a study is predicted positive at ``p >= threshold``."""
    return lambda y, s: metric(y, M.predictions(s, threshold))


def counts(y_true: npt.ArrayLike, predicted: npt.ArrayLike) -> dict[str, int]:
    """TP, FP, TN, FN of 0/1 predictions."""
    (tn, fp), (fn, tp) = M.confusion(y_true, predicted)
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}
