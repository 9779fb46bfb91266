"""The typed shape of a scored study: ``Result.details`` in the database and the entries
of ``triaged score --json``.

The worker writes it, ``triaged score`` prints it, the web reads it: one schema keeps
them from drifting (the web once looked for a threshold where the worker never put it).
Reading is tolerant: a row written by an older version, or one with a damaged field, loads
with that field at its default instead of breaking the study page.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("triaged.result_details")

DEFAULT_THRESHOLD = 0.5


class _Schema(BaseModel):
    # unknown keys (a newer or older writer) are kept, not refused
    model_config = ConfigDict(extra="allow")


class ModelRef(_Schema):
    name: str
    version: str


class SliceRef(_Schema):
    """A slice by its position in the scored series (sorted along the slice normal)."""

    index: int
    sop_instance_uid: str = ""


class SliceScore(_Schema):
    index: int
    fusion: float
    cbam: float | None = None


class OodSummary(_Schema):
    """The out-of-distribution assessment (``triaged.pipeline.ood``); ``reason`` is set only
    when the study is out of distribution (then it was not flagged on its score alone)."""

    distance_share: float = 0.0
    slices_beyond: int = 0
    slices: int = 0
    threshold: float | None = None
    max_share: float | None = None
    reason: str | None = None


class ScoreSummary(_Schema):
    """What scoring concluded about a study, without pixels (``StudyScore.to_dict``)."""

    pipeline: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    series_reason: str = ""
    fusion_probability: float | None = None
    cbam_probability: float | None = None
    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    positive: bool = False
    priority: int = 0
    flag: bool = False
    requested_priority: str | None = None
    model: ModelRef | None = None
    cbam_model: ModelRef | None = None
    key_slice: SliceRef | None = None
    top_slices: list[SliceRef] = Field(default_factory=list)
    infected_pixels: dict[str, int] = Field(default_factory=dict)
    outputs: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    ood: OodSummary | None = None  # None: the model version has no OOD fit (or an older row)

    @property
    def ood_reason(self) -> str | None:
        return self.ood.reason if self.ood is not None else None

    # study decision (issue 12): fusion_probability is calibrated when calibrated_on is set
    raw_probability: float | None = None
    operating_point: str | None = None
    calibrated_on: int | None = None
    aggregation: str = ""


class ScoredStudy(ScoreSummary):
    """One scored entry of ``triaged score --json`` (its field names are a contract)."""

    state: Literal["SCORED"] = "SCORED"
    fusion_probability: float
    slices: list[SliceScore] = Field(default_factory=list)
    files: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """``files`` appears only when result objects were written (``--output``)."""
        return self.model_dump(mode="json", exclude={"files"} if self.files is None else None)


class SkippedStudy(_Schema):
    """A study ``triaged score`` could not score, and why."""

    study_instance_uid: str
    state: Literal["SKIPPED"] = "SKIPPED"
    reason: str


class ObjectRef(_Schema):
    sop_instance_uid: str
    path: str


class ResultDetails(_Schema):
    """``Result.details``: what the study page shows beyond the result's own columns.

    ``slice_indices[n]`` is the series position of the n-th scored slice, so the
    ``n``-th entry of ``Result.slice_probabilities`` belongs to slice ``slice_indices[n]``;
    ``Result.key_slice`` is a series position too.
    """

    images: dict[str, str] = Field(default_factory=dict)
    sr_text: list[str] = Field(default_factory=list)
    summary: ScoreSummary = Field(default_factory=ScoreSummary)
    slice_indices: list[int] | None = None
    cbam_slice_probabilities: list[float] | None = None
    objects: dict[str, ObjectRef] = Field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return self.summary.threshold

    def plot_position(self, key_slice: int | None, n_scores: int) -> int | None:
        """Where the series slice ``key_slice`` is among the ``n_scores`` scored slices.

        Without ``slice_indices`` the scores are taken to cover the series one to one.
        """
        if key_slice is None:
            return None
        if self.slice_indices is None:
            return key_slice if 0 <= key_slice < n_scores else None
        try:
            pos = self.slice_indices.index(key_slice)
        except ValueError:
            return None
        return pos if pos < n_scores else None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def load(cls, raw: object) -> ResultDetails:
        """Parse a stored row; fields that do not fit fall back to their defaults."""
        if not isinstance(raw, dict):
            return cls()
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            bad = {str(e["loc"][0]) for e in err.errors() if e["loc"]}
            log.warning("result details: ignoring malformed field(s) %s", ", ".join(sorted(bad)))
            kept = {k: v for k, v in raw.items() if k not in bad}
            try:
                return cls.model_validate(kept)
            except ValidationError:
                return cls()
