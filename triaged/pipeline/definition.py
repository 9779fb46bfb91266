"""Pipeline files (``pipelines/*.toml``) -> a validated, typed :class:`Pipeline`.

A pipeline is everything that decides how one kind of study is scored: which series is
eligible, how slices are prepared, which registered models score them, how slice scores become
a study score, how that score becomes a worklist priority and flag, and which DICOM objects are
written back. Keeping it in one file lets a site tune thresholds without touching code, and
keeps the daemon (``triaged serve``) and offline scoring (``triaged score``) on the very same
settings.

Every section is a pydantic model with ``extra="forbid"``: a misspelt key is an error naming the
key (``PipelineError: covid-ct.toml: unknown key 'priority.levels.0.flagg'``), never a silently
ignored setting. Relative paths are resolved against the pipeline file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from triaged.config import describe_validation_error, read_toml
from triaged.pipeline.hu import LUNG_WINDOW

RequestedPriority = Literal["STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"]
REQUESTED_PRIORITIES: tuple[str, ...] = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")


class PipelineError(Exception):
    """A mistake in a pipeline file, reported as one line that names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeriesSection(_Section):
    """Which series of a study may be scored (passed to ``triaged.dicom.series``)."""

    modality: str = "CT"
    max_axial_deviation_deg: float = Field(default=15.0, ge=0.0, le=90.0)
    min_slices: int = Field(default=1, ge=1)
    exclude_image_types: list[str] = Field(
        default_factory=lambda: ["LOCALIZER", "DERIVED", "SECONDARY"]
    )
    preference: Literal["most_slices", "thinnest"] = "most_slices"


class PreprocessSection(_Section):
    """Lung window and slice choice.

    ``lung_threshold`` is the fraction of a slice's pixels that must be lung (HU within
    ``lung_hu``) for the slice to count as containing lung; up to ``slices`` of those are taken,
    evenly spaced from the first to the last.
    """

    window_width: float = Field(default=LUNG_WINDOW[1], gt=0.0)
    window_level: float = LUNG_WINDOW[0]
    slices: int = Field(default=32, ge=1, le=1024)
    lung_threshold: float = Field(default=0.02, ge=0.0, lt=1.0)
    lung_hu: tuple[float, float] = (-950.0, -400.0)

    @field_validator("lung_hu")
    @classmethod
    def _hu_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("lung_hu must be [low, high] with low < high")
        return v


class ModelEntry(_Section):
    """One model the pipeline runs, by name in the model store and version.

    ``version = "live"`` follows the store's live pointer (promote/rollback take effect between
    studies); an exact version pins it. ``fast`` = bfloat16 autocast on CPU (see
    ``triaged.nets.inference``); turn it off when a model card shows fast-mode disagreement
    near the decision threshold.
    """

    role: Literal["fusion", "cbam"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    version: str = Field(default="live", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    batch_size: int = Field(default=16, ge=1, le=1024)
    fast: bool = True


class AggregateSection(_Section):
    """Slice probabilities -> study probability.

    - ``mean_top_k``: mean of the ``k`` highest slice probabilities (all slices when fewer).
      A study is as suspicious as its most suspicious few slices; averaging a few damps one
      noisy slice, while averaging all slices would drown focal disease in healthy lung.
    - ``max``: the highest slice probability (``mean_top_k`` with k = 1).
    - ``mean``: the mean over every selected slice.
    """

    method: Literal["mean_top_k", "max", "mean"] = "mean_top_k"
    k: int = Field(default=3, ge=1)


class PriorityLevel(_Section):
    """One priority level: studies at or above its threshold get ``priority`` (and ``flag``).

    The threshold is either ``operating_point``, the name of an operating point fitted on
    validation studies and stored in the live fusion model's card (``triaged validate
    --fit``), or ``min_probability``, a fixed study probability. Given both,
    ``min_probability`` is the fallback used while the live model's card has no fitted study
    decision; an ``operating_point`` without a fallback makes scoring SKIP such studies with a
    reason, rather than guess a threshold.
    """

    operating_point: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    min_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    priority: int
    flag: bool = False

    @model_validator(mode="after")
    def _threshold_given(self) -> PriorityLevel:
        if self.operating_point is None and self.min_probability is None:
            raise ValueError("a priority level needs operating_point or min_probability")
        return self


def _default_levels() -> list[PriorityLevel]:
    return [
        PriorityLevel(min_probability=0.8, priority=100, flag=True),
        PriorityLevel(min_probability=0.5, priority=50, flag=False),
    ]


def _default_requested() -> dict[RequestedPriority, int]:
    return {"STAT": 150, "HIGH": 25, "ROUTINE": 0, "MEDIUM": 0, "LOW": 0}


class PrioritySection(_Section):
    """Fusion probability (+ the order's requested priority) -> worklist priority and flag.

    Of the ``levels`` whose threshold the study probability reaches (``min_probability``, or
    the card's fitted ``operating_point``: see :class:`PriorityLevel`), the one with the
    highest priority gives the priority and flag; below all levels: ``default`` and no flag.
    ``requested`` then *adds* a bonus for the requested procedure priority the PACS sent
    (0040,1003): a STAT order outranks every non-STAT study, and a likely-COVID STAT study still
    outranks a negative STAT study. The flag depends on the probability alone: it means "likely
    COVID-19", not "urgent order". ``sr_threshold`` is where the SR says Present instead of
    Absent.
    """

    levels: list[PriorityLevel] = Field(default_factory=_default_levels)
    default: int = 0
    requested: dict[RequestedPriority, int] = Field(default_factory=_default_requested)
    sr_threshold: float = Field(default=0.5, ge=0.0, le=1.0)

    @field_validator("levels")
    @classmethod
    def _distinct_levels(cls, v: list[PriorityLevel]) -> list[PriorityLevel]:
        cuts = [lv.min_probability for lv in v if lv.min_probability is not None]
        if len(set(cuts)) != len(cuts):
            raise ValueError("two priority levels share one min_probability")
        names = [lv.operating_point for lv in v if lv.operating_point is not None]
        if len(set(names)) != len(names):
            raise ValueError("two priority levels name one operating_point")
        return v

    def ordered_levels(self) -> list[PriorityLevel]:
        """Fixed-threshold levels, highest first (levels with only an operating point, whose
        threshold is in the model card, are resolved by ``priority.resolve_levels``)."""
        fixed = [lv for lv in self.levels if lv.min_probability is not None]
        return sorted(fixed, key=lambda lv: lv.min_probability or 0.0, reverse=True)


class OutputsSection(_Section):
    """Which result objects to write and how many top slices keep heat-maps and masks."""

    sr: bool = True
    sc: bool = True
    seg: bool = True
    top_slices: int = Field(default=3, ge=1, le=64)


class Pipeline(_Section):
    """One pipeline file, validated. ``path`` is the file it came from, if any."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    model_store: Path | None = None
    series: SeriesSection = Field(default_factory=SeriesSection)
    preprocess: PreprocessSection = Field(default_factory=PreprocessSection)
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    aggregate: AggregateSection = Field(default_factory=AggregateSection)
    priority: PrioritySection = Field(default_factory=PrioritySection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)
    path: Path | None = None

    @field_validator("models")
    @classmethod
    def _roles(cls, v: list[ModelEntry]) -> list[ModelEntry]:
        roles = [m.role for m in v]
        if roles.count("fusion") != 1:
            raise ValueError('exactly one model must have role = "fusion"')
        if roles.count("cbam") > 1:
            raise ValueError('at most one model may have role = "cbam"')
        return v

    def model(self, role: str) -> ModelEntry | None:
        """The entry of ``role``, or None when the pipeline has no such model."""
        return next((m for m in self.models if m.role == role), None)

    @property
    def ref(self) -> str:
        """``name:version``, how logs and result objects name the pipeline."""
        return f"{self.name}:{self.version}"


def from_dict(raw: dict[str, object], base: Path | None = None) -> Pipeline:
    """Validate a parsed pipeline; relative paths are anchored at ``base`` when given."""
    data = dict(raw)
    data.pop("path", None)
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as err:
        raise PipelineError(describe_validation_error(err)) from None
    if base is not None and pipeline.model_store is not None:
        store = pipeline.model_store
        if not store.is_absolute():
            pipeline = pipeline.model_copy(update={"model_store": (base / store).resolve()})
    return pipeline


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate one pipeline file; errors are one line naming the file and the key."""
    p = Path(path)
    raw = read_toml(p, PipelineError, "pipeline file")
    try:
        pipeline = from_dict(raw, p.resolve().parent)
    except PipelineError as err:
        raise PipelineError(f"{p}: {err}") from None
    return pipeline.model_copy(update={"path": p.resolve()})
