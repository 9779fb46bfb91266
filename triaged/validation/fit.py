"""`triaged validate --fit`: fit the study decision on labelled studies and register it.

The studies are scored by the daemon's own path (:func:`evaluate.score_rows`), their fusion
slice probabilities feed :func:`triaged.pipeline.calibration.fit_study_decision`, and the
result is stored as a NEW version of the fusion model: same weights (copied, hash checked by
the store), a card that carries the ``study_decision`` and its provenance. Promote and
rollback then move the model and its calibration together, like any other version.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from triaged.config import Settings
from triaged.pipeline.calibration import DEFAULT_TARGETS, StudyDecision, Target
from triaged.pipeline.calibration import fit_study_decision as fit_decision
from triaged.pipeline.definition import PriorityLevel, PrioritySection
from triaged.processing import PipelineProcessor
from triaged.registry import ModelVersion
from triaged.validation.evaluate import (
    StudyResult,
    StudySource,
    read_labels,
    score_rows,
)

_TARGET = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})=(sensitivity|specificity):([0-9.]+)$")


class FitError(Exception):
    """Why a study decision could not be fitted; one line for the user."""


@dataclass(frozen=True)
class FitOutcome:
    version: ModelVersion
    fitted_from: str
    decision: StudyDecision
    results: list[StudyResult]
    promoted: bool


def parse_target(text: str) -> Target:
    """``NAME=specificity:0.9`` or ``NAME=sensitivity:0.9`` -> :class:`Target`."""
    m = _TARGET.match(text.strip())
    if m is None:
        raise FitError(
            f"operating point {text!r}: use NAME=specificity:0.9 or NAME=sensitivity:0.9"
        )
    value = float(m.group(3))
    if not 0.0 < value <= 1.0:
        raise FitError(f"operating point {text!r}: the target must be in (0, 1]")
    if m.group(2) == "sensitivity":
        return Target(m.group(1), "sensitivity", value)
    return Target(m.group(1), "specificity", value)


def fit_results(
    results: list[StudyResult],
    processor: PipelineProcessor,
    source: str,
    targets: tuple[Target, ...] | list[Target] = DEFAULT_TARGETS,
) -> tuple[ModelVersion, StudyDecision]:
    """The fusion version all studies were scored with, and the decision fitted for it."""
    scored = [r for r in results if r.state == "SCORED" and r.slice_probabilities]
    if not scored:
        raise FitError("no study was scored (see the reasons above); nothing to fit")
    refs = {r.models.get("fusion") for r in scored}
    if len(refs) != 1:
        raise FitError(
            "the studies were scored by different fusion versions "
            f"({', '.join(sorted(str(r) for r in refs))}); run again"
        )
    loaded = processor.loaded.fusion if processor.loaded is not None else None
    if loaded is None or loaded.version.ref != refs.pop():
        raise FitError("the live fusion model changed while scoring; run again")
    labels = [r.label for r in scored]
    if 0 not in labels or 1 not in labels:
        raise FitError(
            f"fitting needs scored positive and negative studies; got "
            f"{sum(labels)} positive of {len(labels)}"
        )
    pre = processor.pipeline.preprocess
    try:
        decision = fit_decision(
            [np.asarray(r.slice_probabilities) for r in scored],
            labels,
            [r.patient for r in scored],
            targets,
            source=source,
            pipeline=processor.pipeline.ref,
            model=loaded.version.ref,
            slice_selection={"slices": pre.slices, "lung_threshold": pre.lung_threshold},
        )
    except ValueError as err:
        raise FitError(str(err)) from None
    return loaded.version, decision


def register_decision(
    processor: PipelineProcessor, base: ModelVersion, decision: StudyDecision, promote: bool
) -> ModelVersion:
    """A new version of ``base`` with the same weights and ``decision`` on its card."""
    card = base.card.model_copy(
        update={
            "study_decision": decision,
            "created": datetime.now(UTC),
            "notes": (f"{base.card.notes} " if base.card.notes else "")
            + f"Study decision fitted on {decision.fitted_on.n_studies} validation studies; "
            f"weights of {base.ref}.",
        }
    )
    store = processor.store
    new = store.register(base.name, base.weights_path, card, files=base.card_files())
    if promote:
        store.promote(new.name, new.version, reason=f"triaged validate --fit from {base.ref}")
    return new


def fitting_processor(processor: PipelineProcessor) -> PipelineProcessor:
    """The same pipeline with fixed priority levels: fitting needs the slice probabilities
    only, and must work before any operating point exists (levels naming one would skip)."""
    priority = PrioritySection(levels=[PriorityLevel(min_probability=0.5, priority=0)])
    pipeline = processor.pipeline.model_copy(update={"priority": priority})
    return PipelineProcessor(pipeline, processor.store, processor.device)


def fit(
    settings: Settings,
    labels: Path,
    processor: PipelineProcessor,
    targets: tuple[Target, ...] | list[Target] = DEFAULT_TARGETS,
    promote: bool = False,
    quiet: bool = False,
) -> FitOutcome:
    """Score the labelled studies, fit the decision, register (and optionally promote) it."""
    rows = read_labels(labels)
    source = StudySource(labels.resolve().parent, settings)
    scorer = fitting_processor(processor)
    try:
        results = score_rows(
            rows, source, scorer, None if quiet else lambda m: print(m, file=sys.stderr)
        )
    finally:
        source.close()
    base, decision = fit_results(results, scorer, str(labels), targets)
    new = register_decision(scorer, base, decision, promote)
    return FitOutcome(new, base.ref, decision, results, promote)
