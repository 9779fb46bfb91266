"""Aggregation of slice probabilities and the priority rule."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from triaged.pipeline.aggregate import aggregate
from triaged.pipeline.definition import AggregateSection, PrioritySection
from triaged.pipeline.priority import prioritise, requested_priority


def test_aggregate_methods() -> None:
    p = np.array([0.1, 0.9, 0.2, 0.7, 0.8])
    assert aggregate(p, AggregateSection(method="mean_top_k", k=3)) == pytest.approx(0.8)
    assert aggregate(p, AggregateSection(method="max")) == pytest.approx(0.9)
    assert aggregate(p, AggregateSection(method="mean")) == pytest.approx(0.54)
    # k larger than the number of slices: all of them
    assert aggregate(p[:2], AggregateSection(k=10)) == pytest.approx(0.5)
    # order does not matter, bit for bit
    section = AggregateSection(method="mean")
    assert aggregate(p, section) == aggregate(p[::-1].copy(), section)
    with pytest.raises(ValueError):
        aggregate(np.array([]), AggregateSection())
    with pytest.raises(ValueError):
        aggregate(np.array([0.5, np.nan]), AggregateSection())


@pytest.mark.parametrize(
    ("p", "requested", "priority", "flag", "positive"),
    [
        (0.95, None, 100, True, True),
        (0.8, None, 100, True, True),
        (0.79, None, 50, False, True),
        (0.5, "ROUTINE", 50, False, True),
        (0.49, None, 0, False, False),
        (0.1, "STAT", 150, False, False),  # a STAT order outranks a likely-COVID routine study
        (0.9, "STAT", 250, True, True),  # ... and a likely-COVID STAT study outranks it
        (0.6, "HIGH", 75, False, True),
        (0.6, "stat ", 200, False, True),  # normalised
        (0.6, "WHENEVER", 50, False, True),  # unknown values are ignored
    ],
)
def test_priority_levels_and_requested_bonus(
    p: float, requested: str | None, priority: int, flag: bool, positive: bool
) -> None:
    out = prioritise(p, PrioritySection(), requested)
    assert (out.priority, out.flag, out.positive) == (priority, flag, positive)


def test_levels_are_applied_highest_first_whatever_their_order_in_the_file() -> None:
    section = PrioritySection.model_validate(
        {
            "levels": [
                {"min_probability": 0.3, "priority": 10},
                {"min_probability": 0.6, "priority": 60, "flag": True},
            ],
            "default": -5,
            "sr_threshold": 0.7,
        }
    )
    assert prioritise(0.65, section, None).priority == 60
    assert prioritise(0.4, section, None).priority == 10
    low = prioritise(0.1, section, None)
    assert (low.priority, low.flag) == (-5, False)
    assert not prioritise(0.65, section, None).positive


def test_requested_priority_top_level_then_request_attributes() -> None:
    ds = pydicom.Dataset()
    assert requested_priority(ds) is None
    item = pydicom.Dataset()
    item.RequestedProcedurePriority = "HIGH"
    ds.RequestAttributesSequence = [item]
    assert requested_priority(ds) == "HIGH"
    ds.RequestedProcedurePriority = "STAT"
    assert requested_priority(ds) == "STAT"
