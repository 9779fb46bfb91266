"""Study probability (+ the order's requested priority) -> worklist priority and flag.

Pure functions of the pipeline's ``[priority]`` section, so the worker, the offline CLI and the
tests agree on one rule (documented on :class:`~triaged.pipeline.definition.PrioritySection`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pydicom

from triaged.pipeline.calibration import StudyDecision
from triaged.pipeline.definition import REQUESTED_PRIORITIES, PrioritySection


@dataclass(frozen=True)
class Priority:
    """Worklist priority (higher is read first), the "likely COVID-19" flag and the SR verdict."""

    priority: int
    flag: bool
    positive: bool
    requested: str | None
    operating_point: str | None = None  # the fitted operating point that fired, if any


@dataclass(frozen=True)
class Level:
    """A priority level with its threshold resolved (from the card or ``min_probability``)."""

    threshold: float
    priority: int
    flag: bool
    operating_point: str | None = None


def resolve_levels(section: PrioritySection, decision: StudyDecision | None) -> list[Level] | str:
    """The levels' thresholds, highest first, or why they cannot be resolved.

    A level naming an ``operating_point`` takes its threshold from ``decision`` (the live
    fusion model's fitted study decision). Without a decision it falls back to its
    ``min_probability``; with no fallback the answer is a reason to skip the study. A decision
    that lacks the named point is a mismatch between pipeline and card: also a reason, never a
    silent fallback.
    """
    out: list[Level] = []
    for lv in section.levels:
        name = lv.operating_point
        if name is not None and decision is not None:
            op = decision.point(name)
            if op is None:
                have = ", ".join(o.name for o in decision.operating_points) or "none"
                return (
                    f"operating point {name!r} of priority level {lv.priority} is not in "
                    f"the fusion model's study decision (it has: {have})"
                )
            out.append(Level(op.threshold, lv.priority, lv.flag, name))
        elif lv.min_probability is not None:
            out.append(Level(lv.min_probability, lv.priority, lv.flag))
        else:
            return (
                f"priority level {lv.priority} uses operating point {name!r}, but the fusion "
                "model's card has no fitted study decision (run `triaged validate --fit`) "
                "and the level gives no min_probability fallback"
            )
    return sorted(out, key=lambda lv: (lv.threshold, lv.priority), reverse=True)


def fixed_levels(section: PrioritySection) -> list[Level]:
    """The levels with a ``min_probability``, highest first (no card needed)."""
    return [
        Level(lv.min_probability, lv.priority, lv.flag)
        for lv in section.ordered_levels()
        if lv.min_probability is not None
    ]


def normalise_requested(value: object) -> str | None:
    """A requested procedure priority as one of STAT/HIGH/ROUTINE/MEDIUM/LOW, else None.

    Unknown values are ignored rather than refused: the order's priority only ever raises a
    study, so a PACS sending something odd must not stop it being scored.
    """
    if value is None:
        return None
    text = str(value).strip().upper()
    return text if text in REQUESTED_PRIORITIES else None


def requested_priority(ds: pydicom.Dataset) -> str | None:
    """Requested Procedure Priority (0040,1003): top level first, then the first item of the
    Request Attributes Sequence (0040,0275), where the standard puts order information."""
    value = ds.get("RequestedProcedurePriority")
    if normalise_requested(value) is None:
        items = ds.get("RequestAttributesSequence") or []
        for item in items:
            found = normalise_requested(item.get("RequestedProcedurePriority"))
            if found is not None:
                return found
    return normalise_requested(value)


def prioritise(
    probability: float,
    section: PrioritySection,
    requested: str | None,
    levels: Sequence[Level] | None = None,
) -> Priority:
    """Apply the levels (resolved by :func:`resolve_levels`; default: the fixed ones), then
    add the requested-priority bonus.

    Of the levels the probability reaches, the one with the highest priority wins, so the
    priority never falls as the probability rises, even when fitted operating points come out
    in another order than their priorities (e.g. "review" at sensitivity >= 0.9 above
    "urgent" at specificity >= 0.9 on well separated studies).
    """
    ordered = fixed_levels(section) if levels is None else levels
    reached = [lv for lv in ordered if probability >= lv.threshold]
    level = max(reached, key=lambda lv: (lv.priority, lv.threshold)) if reached else None
    base = level.priority if level is not None else section.default
    flag = level.flag if level is not None else False
    req = normalise_requested(requested)
    bonus = section.requested.get(req, 0) if req is not None else 0  # type: ignore[call-overload]
    return Priority(
        priority=base + bonus,
        flag=flag,
        positive=probability >= section.sr_threshold,
        requested=req,
        operating_point=level.operating_point if level is not None else None,
    )
