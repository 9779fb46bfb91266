"""Slice probabilities -> one study probability (see ``AggregateSection`` for the methods)."""

from __future__ import annotations

import numpy as np

from triaged.pipeline.definition import AggregateSection


def aggregate(probabilities: np.ndarray, section: AggregateSection) -> float:
    """The study probability of slice probabilities ``(N,)`` by ``section.method``.

    Sorting is stable and the sum is in float64, so the result depends on the values only,
    never on the slice order or the machine's summation order.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("no slice probabilities to aggregate")
    if not np.all(np.isfinite(p)):
        raise ValueError("slice probabilities must be finite")
    if section.method == "mean":
        return float(np.mean(np.sort(p, kind="stable")))
    k = 1 if section.method == "max" else min(section.k, p.size)
    top = np.sort(p, kind="stable")[::-1][:k]
    return float(np.mean(top))
