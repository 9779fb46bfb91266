"""Validation metrics: ECE by hand, patient-level bootstrap resampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from triaged.training import metrics as M
from triaged.validation import metrics as V


def test_ece_equals_hand_computed_value() -> None:
    # bin 0: p .05, y 0 -> |0 - .05| = .05 (1 study)
    # bin 1: p .15, .15, y 1, 0 -> |.5 - .15| = .35 (2 studies)
    # bin 3: p exactly .3 belongs to [.3, .4): y 1 -> |1 - .3| = .7 (1 study)
    # bin 9: p .95, .95, .95, 1.0 (1.0 goes to the last bin), y 1, 1, 1, 0
    #        -> mean p .9625, observed .75 -> .2125 (4 studies)
    p = [0.05, 0.15, 0.15, 0.3, 0.95, 0.95, 0.95, 1.0]
    y = [0, 1, 0, 1, 1, 1, 1, 0]
    expected = (1 * 0.05 + 2 * 0.35 + 1 * 0.7 + 4 * 0.2125) / 8
    assert V.ece(y, p) == pytest.approx(expected, abs=1e-12)
    bins = V.reliability(y, p)
    assert [b.count for b in bins] == [1, 2, 0, 1, 0, 0, 0, 0, 0, 4]
    assert bins[9].mean_probability == pytest.approx(0.9625)
    assert np.isnan(bins[2].observed)


def test_ece_is_zero_when_calibrated_and_nan_without_studies() -> None:
    assert V.ece([0, 1, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)
    assert np.isnan(V.ece([], []))


def test_patient_bootstrap_draws_all_studies_of_a_patient_together() -> None:
    # studies 0 and 1 belong to patient A; the others are patients of their own
    groups = ["A", "A", "B", "C", "D"]
    resamples = list(V.patient_resamples(groups, n_resamples=300, seed=3))
    assert len(resamples) == 300
    copies_of_a = set()
    for idx in resamples:
        c = Counter(idx.tolist())
        assert c[0] == c[1]  # never one of A's studies without the other
        copies_of_a.add(c[0])
        assert len(idx) == 4 + c[0] * 1  # 4 patients drawn; A brings 2 studies
    assert copies_of_a >= {0, 1, 2}  # A is drawn 0, 1, 2, ... times: a real resampling
    # seeded: the same resamples again
    again = list(V.patient_resamples(groups, n_resamples=300, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(resamples, again, strict=True))


def test_patient_bootstrap_interval_covers_the_estimate_and_drops_undefined() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    s = np.clip(y * 0.4 + rng.uniform(0, 0.6, y.size), 0, 1)
    groups = [f"p{i // 2}" for i in range(y.size)]  # two studies per patient
    est = V.patient_bootstrap({"auc": M.auc, "ece": V.ece}, y, s, groups, 200, seed=1)
    assert est["auc"].value == pytest.approx(M.auc(y, s))
    lo, hi = est["auc"].ci
    assert lo <= est["auc"].value <= hi
    assert est["auc"].defined == 200
    # one patient holding the only positive: AUC undefined in resamples without it
    one = V.patient_bootstrap({"auc": M.auc}, [1, 0, 0], [0.9, 0.1, 0.2], ["a", "b", "c"], 200)
    assert 0 < one["auc"].defined < 200
