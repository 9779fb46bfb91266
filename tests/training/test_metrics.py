"""Metrics against scikit-learn on fixed vectors, COVID = 1 as the positive class."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from triaged.training import metrics as m

Y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1])
S = np.array([0.9, 0.4, 0.65, 0.3, 0.2, 0.7, 0.8, 0.1, 0.5, 0.5, 0.35, 0.5])


def test_threshold_metrics_match_sklearn() -> None:
    p = m.predictions(S, 0.5)
    assert p.tolist() == [1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1]
    assert m.accuracy(Y, p) == pytest.approx(skm.accuracy_score(Y, p))
    assert m.f1(Y, p) == pytest.approx(skm.f1_score(Y, p, pos_label=1))
    assert m.confusion(Y, p).tolist() == skm.confusion_matrix(Y, p, labels=[0, 1]).tolist()
    assert m.sensitivity(Y, p) == pytest.approx(skm.recall_score(Y, p, pos_label=1))
    assert m.specificity(Y, p) == pytest.approx(skm.recall_score(Y, p, pos_label=0))


def test_auc_with_ties_matches_sklearn() -> None:
    assert m.auc(Y, S) == pytest.approx(skm.roc_auc_score(Y, S))
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # heavy ties
    assert m.auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert math.isnan(m.auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_roc_curve_matches_sklearn() -> None:
    fpr, tpr, thr = m.roc_curve(Y, S)
    efpr, etpr, ethr = skm.roc_curve(Y, S)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    np.testing.assert_allclose(thr, ethr)


def test_f1_when_nothing_predicted_positive() -> None:
    assert m.f1([1, 0, 1], [0, 0, 0]) == 0.0
    with pytest.raises(ValueError):
        m.accuracy([0, 2], [0, 1])


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 150)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    lo, hi = m.bootstrap_ci(m.auc, y, s, n_resamples=400, seed=5)
    assert (lo, hi) == m.bootstrap_ci(m.auc, y, s, n_resamples=400, seed=5)
    assert (lo, hi) != m.bootstrap_ci(m.auc, y, s, n_resamples=400, seed=6)
    est = m.auc(y, s)
    assert lo < est < hi
    assert 0.02 < hi - lo < 0.3


def test_report_collects_everything() -> None:
    r = m.report(Y, S, n_resamples=200, seed=1)
    d = r.as_dict()
    assert d["n"] == 12 and d["n_covid"] == 6
    assert d["auc"] == pytest.approx(skm.roc_auc_score(Y, S))
    assert d["confusion"] == [[4, 2], [1, 5]]
    assert d["accuracy_ci"][0] <= d["accuracy"] <= d["accuracy_ci"][1]
    assert isinstance(d["f1_ci"], list)


def test_dice() -> None:
    a = np.zeros((8, 8), dtype=np.uint8)
    b = np.zeros((8, 8), dtype=np.uint8)
    a[2:6, 2:6] = 255
    b[4:8, 4:8] = 1
    expected = 2 * 4 / (16 + 16)
    assert m.dice(a, b) == pytest.approx(expected)
    assert m.dice(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected)
    assert m.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert m.dice(a, np.zeros((8, 8))) == pytest.approx(0.0, abs=1e-6)
    # Same as scikit-learn's F1 on flattened masks.
    assert m.dice(a, b) == pytest.approx(skm.f1_score(b.ravel() > 0, a.ravel() > 0))
