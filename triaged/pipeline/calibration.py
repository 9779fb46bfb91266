"""The study decision: slice probabilities -> calibrated study probability -> operating point.

Fitted on a site's labelled validation studies (``triaged validate --fit``) and stored in the
fusion model's card (:class:`StudyDecision`), so a model and the decision fitted for it are
promoted and rolled back together.

Why each choice:

- **Aggregation** is chosen from a small fixed set (:data:`CANDIDATES`: mean, max, mean of the
  top k for a few k, a few quantiles, noisy-OR) by study-level AUC on the fitting studies;
  ties (common when the studies separate perfectly) go to the lower log-loss after Platt
  calibration, then to the earlier, simpler candidate. Ranking is what the operating points
  use, so AUC comes first; every candidate gets the same two calibration parameters, so
  comparing in-sample log-loss is fair between them.
- **Calibration** is Platt scaling: a logistic regression on the logit of the aggregated score
  (two parameters, L2-regularised so perfectly separated studies still give finite, moderate
  parameters). Isotonic regression needs hundreds of studies to be stable; a site validation
  set is usually tens, and Platt keeps the map strictly monotone, so it never merges ranks.
- **Operating points** are thresholds on the calibrated probability that meet a target on the
  fitting studies: ``specificity >= t`` takes the lowest such threshold (most sensitive),
  ``sensitivity >= t`` the highest (most specific). The threshold sits halfway between the
  boundary study and the next lower one, so studies just like the fitting ones do not flip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_EPS = 1e-6


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Aggregation(_Model):
    """How slice probabilities become one score: ``k`` for mean_top_k, ``q`` for quantile."""

    method: Literal["mean", "max", "mean_top_k", "quantile", "noisy_or"]
    k: int | None = Field(default=None, ge=1)
    q: float | None = Field(default=None, ge=0.0, le=1.0)

    def describe(self) -> str:
        if self.method == "mean_top_k":
            return f"mean of top {self.k}"
        if self.method == "quantile":
            return f"quantile {self.q:g}"
        return self.method.replace("_", "-")


class Calibration(_Model):
    """``p = sigmoid(a * logit(score) + b)`` (Platt scaling)."""

    method: Literal["platt"] = "platt"
    a: float
    b: float


class OperatingPoint(_Model):
    """A named threshold on the calibrated probability and what it achieved when fitted."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    target: Literal["sensitivity", "specificity"]
    minimum: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0)
    val_sensitivity: float | None = None
    val_specificity: float | None = None


class FittedOn(_Model):
    """Provenance of the fit: how many studies, patients and where they came from."""

    n_studies: int = Field(ge=1)
    n_patients: int = Field(ge=1)
    n_positive: int = Field(ge=0)
    n_negative: int = Field(ge=0)
    source: str = ""
    pipeline: str = ""
    model: str = ""
    auc: float | None = None
    log_loss: float | None = None
    fitted: datetime = Field(default_factory=lambda: datetime.now(UTC))


class StudyDecision(_Model):
    """Everything scoring needs to turn a fusion model's slice probabilities into a decision."""

    slice_selection: dict[str, float | int] | None = None
    aggregation: Aggregation
    calibration: Calibration
    operating_points: list[OperatingPoint] = Field(default_factory=list)
    fitted_on: FittedOn

    def point(self, name: str) -> OperatingPoint | None:
        return next((op for op in self.operating_points if op.name == name), None)

    def probability(self, slice_probabilities: np.ndarray) -> tuple[float, float]:
        """(calibrated study probability, raw aggregated score)."""
        raw = aggregate_score(slice_probabilities, self.aggregation)
        return calibrate(raw, self.calibration), raw


#: The aggregations :func:`choose_aggregation` compares, simplest first (ties go to the first).
CANDIDATES: tuple[Aggregation, ...] = (
    Aggregation(method="mean"),
    Aggregation(method="max"),
    *(Aggregation(method="mean_top_k", k=k) for k in (2, 3, 5, 8)),
    *(Aggregation(method="quantile", q=q) for q in (0.5, 0.75, 0.9)),
    Aggregation(method="noisy_or"),
)


def _slices(probabilities: np.ndarray | Sequence[float]) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("no slice probabilities to aggregate")
    if not np.all(np.isfinite(p)):
        raise ValueError("slice probabilities must be finite")
    return p


def _noisy_or_logit(p: np.ndarray) -> float:
    """logit(1 - prod(1 - p)) without saturating: with s = -sum(log(1 - p)) it is
    log(expm1(s)), written so large s stays finite."""
    s = float(-np.sum(np.log1p(-np.clip(p, _EPS, 1 - _EPS))))
    return s + float(np.log(-np.expm1(-s)))


def score_logit(probabilities: np.ndarray | Sequence[float], agg: Aggregation) -> float:
    """The aggregated score on the logit scale (the calibration's input)."""
    p = _slices(probabilities)
    if agg.method == "noisy_or":
        return _noisy_or_logit(p)
    return float(_logit(np.asarray(aggregate_score(p, agg))))


def aggregate_score(probabilities: np.ndarray | Sequence[float], agg: Aggregation) -> float:
    """The raw study score in [0, 1]; sorting is stable and sums are float64, so the value
    depends on the probabilities only, not on the slice order."""
    p = np.sort(_slices(probabilities), kind="stable")
    if agg.method == "mean":
        return float(np.mean(p))
    if agg.method == "max":
        return float(p[-1])
    if agg.method == "mean_top_k":
        k = min(int(agg.k or 1), p.size)
        return float(np.mean(p[::-1][:k]))
    if agg.method == "quantile":
        return float(np.quantile(p, float(agg.q if agg.q is not None else 0.5)))
    return float(-np.expm1(np.sum(np.log1p(-np.clip(p, 0.0, 1.0)))))  # noisy-OR


def _logit(x: np.ndarray) -> np.ndarray:
    c = np.clip(x, _EPS, 1 - _EPS)
    return np.log(c) - np.log1p(-c)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))


def calibrate(raw: float, cal: Calibration) -> float:
    """The calibrated probability of one raw score (see :class:`Calibration`)."""
    return float(_sigmoid(cal.a * _logit(np.asarray(raw)) + cal.b))


def calibrate_logits(z: np.ndarray, cal: Calibration) -> np.ndarray:
    return _sigmoid(cal.a * np.asarray(z, dtype=np.float64) + cal.b)


def fit_platt(z: np.ndarray, y: np.ndarray, c: float = 1.0) -> Calibration:
    """Logistic regression of ``y`` on the score logits ``z`` (scikit-learn, L2 with ``C``)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=np.int64)
    if len(set(y.tolist())) < 2:
        raise ValueError("calibration needs positive and negative studies")
    model = LogisticRegression(C=c, solver="lbfgs", max_iter=1000)
    model.fit(np.asarray(z, dtype=np.float64).reshape(-1, 1), y)
    a = float(model.coef_[0][0])
    if a <= 0:  # a score that does not rise with disease: keep the map monotone increasing
        raise ValueError(
            "the aggregated score does not increase with the label; "
            "cannot calibrate (is the model any good on these studies?)"
        )
    return Calibration(a=a, b=float(model.intercept_[0]))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    t = np.asarray(y, dtype=np.float64)
    return float(-np.mean(t * np.log(q) + (1 - t) * np.log1p(-q)))


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(y), np.asarray(s)))


@dataclass(frozen=True)
class Candidate:
    """One aggregation's result on the fitting studies."""

    aggregation: Aggregation
    auc: float
    log_loss: float
    calibration: Calibration | None


def _evaluate(slices: Sequence[np.ndarray], y: np.ndarray, agg: Aggregation) -> Candidate:
    z = np.asarray([score_logit(p, agg) for p in slices])
    try:
        cal: Calibration | None = fit_platt(z, y)
    except ValueError:
        cal = None
    loss = log_loss(y, calibrate_logits(z, cal)) if cal is not None else float("inf")
    return Candidate(agg, auc(y, z), loss, cal)


def choose_aggregation(
    slices: Sequence[np.ndarray], labels: Sequence[int]
) -> tuple[Candidate, list[Candidate]]:
    """The best of :data:`CANDIDATES` (highest AUC, then lowest log-loss, then first) and all
    of them, for the report."""
    y = np.asarray(labels, dtype=np.int64)
    if len(slices) != y.size:
        raise ValueError("one label per study")
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError("fitting needs positive and negative studies")
    results = [_evaluate(slices, y, agg) for agg in CANDIDATES]
    usable = [c for c in results if c.calibration is not None]
    if not usable:
        raise ValueError("no aggregation rises with the label on these studies; cannot fit")
    best = max(usable, key=lambda c: (round(c.auc, 9), -c.log_loss))
    return best, results


@dataclass(frozen=True)
class Target:
    """An operating point to fit: ``name`` meets ``metric >= minimum`` on the fitting studies."""

    name: str
    metric: Literal["sensitivity", "specificity"]
    minimum: float


#: What ``triaged validate --fit`` fits when not told otherwise.
DEFAULT_TARGETS: tuple[Target, ...] = (
    Target("urgent", "specificity", 0.90),
    Target("review", "sensitivity", 0.90),
)


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    return float(np.mean(pred[pos])), float(np.mean(~pred[neg]))


def operating_point(y: np.ndarray, p: np.ndarray, target: Target) -> OperatingPoint:
    """The threshold on calibrated probabilities ``p`` meeting ``target`` (see module doc)."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    values = np.unique(p)  # ascending; a cut at values[i] calls values[i:] positive
    cuts = [*values.tolist(), float(np.nextafter(values[-1], np.inf))]
    idx = 0 if target.metric == "sensitivity" else len(cuts) - 1
    meets = [
        i
        for i, c in enumerate(cuts)
        if _rates(y, p, c)[0 if target.metric == "sensitivity" else 1] >= target.minimum
    ]
    if meets:
        idx = max(meets) if target.metric == "sensitivity" else min(meets)
    if idx == 0:
        threshold = 0.0
    elif idx >= len(values):
        threshold = min(1.0, float(values[-1] + (1.0 - values[-1]) / 2))
    else:
        threshold = float((values[idx] + values[idx - 1]) / 2)
    sens, spec = _rates(y, p, threshold)
    return OperatingPoint(
        name=target.name,
        target=target.metric,
        minimum=target.minimum,
        threshold=threshold,
        val_sensitivity=sens,
        val_specificity=spec,
    )


def fit_study_decision(
    slices: Sequence[np.ndarray | Sequence[float]],
    labels: Sequence[int],
    patients: Sequence[str],
    targets: Sequence[Target] = DEFAULT_TARGETS,
    *,
    source: str = "",
    pipeline: str = "",
    model: str = "",
    slice_selection: dict[str, float | int] | None = None,
) -> StudyDecision:
    """Choose the aggregation, fit Platt calibration and the operating points on these studies."""
    arrays = [_slices(s) for s in slices]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError("two operating points share one name")
    best, _ = choose_aggregation(arrays, labels)
    assert best.calibration is not None
    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray([score_logit(p, best.aggregation) for p in arrays])
    p = calibrate_logits(z, best.calibration)
    return StudyDecision(
        slice_selection=slice_selection,
        aggregation=best.aggregation,
        calibration=best.calibration,
        operating_points=[operating_point(y, p, t) for t in targets],
        fitted_on=FittedOn(
            n_studies=int(y.size),
            n_patients=len(set(patients)),
            n_positive=int(y.sum()),
            n_negative=int(y.size - y.sum()),
            source=source,
            pipeline=pipeline,
            model=model,
            auc=best.auc,
            log_loss=best.log_loss,
        ),
    )
