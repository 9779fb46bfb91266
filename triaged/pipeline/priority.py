"""Study probability (+ the order's requested priority) -> worklist priority and flag.

Pure functions of the pipeline's ``[priority]`` section, so the worker, the offline CLI and the
tests agree on one rule (documented on :class:`~triaged.pipeline.definition.PrioritySection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pydicom

from triaged.pipeline.definition import REQUESTED_PRIORITIES, PrioritySection


@dataclass(frozen=True)
class Priority:
    """Worklist priority (higher is read first), the "likely COVID-19" flag and the SR verdict."""

    priority: int
    flag: bool
    positive: bool
    requested: str | None


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


def prioritise(probability: float, section: PrioritySection, requested: str | None) -> Priority:
    """Apply the pipeline's levels, then add the requested-priority bonus."""
    level = next(
        (lv for lv in section.ordered_levels() if probability >= lv.min_probability), None
    )
    base = level.priority if level is not None else section.default
    flag = level.flag if level is not None else False
    req = normalise_requested(requested)
    bonus = section.requested.get(req, 0) if req is not None else 0  # type: ignore[call-overload]
    return Priority(
        priority=base + bonus,
        flag=flag,
        positive=probability >= section.sr_threshold,
        requested=req,
    )
