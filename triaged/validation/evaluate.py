"""Score a site's labelled studies through the daemon's own scoring path and summarise them.

The labels file is CSV with a header: ``study`` (a folder of one study's DICOM files,
relative to the CSV file, or a Study Instance UID the daemon has received, looked up in the
configured database), ``label`` (1 = COVID-19, 0 = not) and optionally ``patient`` (any
pseudonymous patient key; rows without one are each their own patient). Other columns are an
error, so a misspelt header is not silently ignored.

Each study is scored by :meth:`triaged.processing.PipelineProcessor.score`, the call the
worker and ``triaged score`` make (series selection, preparation, models, aggregation,
priority): nothing here re-implements a step. A study the pipeline skips (no eligible
series, no lung, ...) or that fails is reported with its reason and left out of the metrics.

Operating points. The pipeline's ``[priority]`` levels are thresholds on the fusion
probability: a study *reaches level L* when its probability is at least
``L.min_probability``, i.e. when the daemon gives it L's priority or a higher level's
(before the requested-procedure-priority bonus, which comes from the order, not the images).
The report gives sensitivity and specificity for each level, for the flag (the daemon's own
``flag`` of each study) and for the SR's ``sr_threshold``.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from triaged import __version__
from triaged.config import Settings
from triaged.pipeline.priority import fixed_levels, resolve_levels
from triaged.pipeline.scoring import Skip
from triaged.processing import PipelineProcessor, group_by_study
from triaged.training import metrics as M
from triaged.validation import metrics as V

COLUMNS = ("study", "label", "patient")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


class LabelsError(Exception):
    """A problem with the labels file or a study it names; one line for the user."""


@dataclass(frozen=True)
class LabelRow:
    study: str
    label: int
    patient: str | None
    line: int


def read_labels(path: Path) -> list[LabelRow]:
    """The rows of the labels CSV; :class:`LabelsError` names the line of any problem."""
    if not path.is_file():
        raise LabelsError(f"no such labels file: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            unknown = [h for h in header if h not in COLUMNS]
            if unknown:
                raise LabelsError(
                    f"{path}: unknown column {unknown[0]!r} (columns: study, label, patient)"
                )
            for needed in ("study", "label"):
                if needed not in header:
                    raise LabelsError(f"{path}: missing column {needed!r}")
            reader.fieldnames = header
            rows = [_row(path, reader.line_num, raw) for raw in reader]
    except (csv.Error, UnicodeDecodeError) as err:
        raise LabelsError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise LabelsError(f"{path}: no studies")
    seen: dict[str, int] = {}
    for r in rows:
        if r.study in seen:
            raise LabelsError(f"{path}:{r.line}: study {r.study!r} already on line {seen[r.study]}")
        seen[r.study] = r.line
    return rows


def _row(path: Path, line: int, raw: dict[str, str | None]) -> LabelRow:
    if None in raw:  # more cells than header columns
        raise LabelsError(f"{path}:{line}: more cells than columns")
    study = (raw.get("study") or "").strip()
    label = (raw.get("label") or "").strip()
    patient = (raw.get("patient") or "").strip() or None
    if not study:
        raise LabelsError(f"{path}:{line}: empty study")
    if label not in ("0", "1"):
        raise LabelsError(f"{path}:{line}: label must be 0 or 1, not {label!r}")
    return LabelRow(study=study, label=int(label), patient=patient, line=line)


@dataclass
class StudyResult:
    """One labelled study and what the pipeline made of it (a row of ``validation.json``)."""

    study: str
    patient: str  # the CSV's patient, else the study itself
    label: int
    study_instance_uid: str | None = None
    state: str = "SCORED"  # SCORED, SKIPPED or FAILED
    reason: str = ""
    probability: float | None = None  # the fusion (study) probability
    cbam_probability: float | None = None
    priority: int | None = None  # as the worklist would show it (requested bonus included)
    flag: bool | None = None
    models: dict[str, str] = field(default_factory=dict)
    raw_probability: float | None = None  # the aggregate before calibration
    operating_point: str | None = None
    slice_probabilities: list[float] | None = None  # fusion, of the selected slices


class StudySource:
    """Turns a ``study`` cell into the files the daemon would score."""

    def __init__(self, base: Path, settings: Settings) -> None:
        self.base = base
        self.settings = settings
        self._engine: Any = None

    def files(self, study: str) -> tuple[str | None, list[Path], str | None]:
        """(Study Instance UID, files, identity problem or None); LabelsError when missing."""
        path = self.base / study
        if path.exists():
            studies = group_by_study([path])
            if not studies:
                raise LabelsError(f"{study}: no DICOM files")
            if len(studies) > 1:
                raise LabelsError(f"{study}: holds {len(studies)} studies; give one per row")
            ((uid, files),) = studies.items()
            return uid, files, None
        if _UID.match(study):
            return self._from_database(study)
        raise LabelsError(f"no such study folder: {path}")

    def _from_database(self, uid: str) -> tuple[str, list[Path], str | None]:
        """The spooled files of a received study, checked as the worker checks them."""
        from sqlalchemy.orm import Session

        from triaged.dicom.identity import RecordedFile, first_mismatch
        from triaged.worklist import db
        from triaged.worklist.studies import study_file_identities

        if self._engine is None:
            self._engine = db.make_engine(self.settings.database.url)
        with Session(self._engine) as s:
            rows = study_file_identities(s, uid)
        if not rows:
            raise LabelsError(
                f"study {uid} is not a folder next to the labels file and has no "
                "files in the daemon's database"
            )
        recorded = [RecordedFile(Path(p), st, se, sop, pid) for p, st, se, sop, pid in rows]
        return uid, [r.path for r in recorded], first_mismatch(recorded)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def score_rows(
    rows: Iterable[LabelRow],
    source: StudySource,
    processor: PipelineProcessor,
    progress: Callable[[str], None] | None = None,
) -> list[StudyResult]:
    """Resolve every row first (a missing study stops before any scoring), then score."""
    rows = list(rows)
    resolved = [(r, *source.files(r.study)) for r in rows]
    out: list[StudyResult] = []
    for n, (row, uid, files, problem) in enumerate(resolved, 1):
        res = StudyResult(
            study=row.study,
            patient=row.patient or f"study:{row.study}",
            label=row.label,
            study_instance_uid=uid,
        )
        if problem is not None:
            res.state, res.reason = "FAILED", f"identity check failed: {problem}"
        else:
            _score_one(res, files, processor)
        out.append(res)
        if progress is not None:
            progress(f"[{n}/{len(resolved)}] {row.study}: {res.state}")
    return out


def _score_one(res: StudyResult, files: list[Path], processor: PipelineProcessor) -> None:
    try:
        outcome = processor.score(files)
    except Exception as err:  # the worker records a FAILED study the same way
        res.state, res.reason = "FAILED", f"{type(err).__name__}: {err}"[:500]
        return
    if isinstance(outcome, Skip):
        res.state, res.reason = "SKIPPED", outcome.reason
        return
    res.probability = outcome.fusion_probability
    res.cbam_probability = outcome.cbam_probability
    res.priority = outcome.priority
    res.flag = outcome.flag
    res.raw_probability = outcome.raw_probability
    res.operating_point = outcome.operating_point
    res.slice_probabilities = list(outcome.fusion_slice_probabilities)
    res.models = {"fusion": f"{outcome.model.name}:{outcome.model.version}"}
    if outcome.cbam_model is not None:
        res.models["cbam"] = f"{outcome.cbam_model.name}:{outcome.cbam_model.version}"


def _operating_points(
    processor: PipelineProcessor,
    y: np.ndarray,
    p: np.ndarray,
    flags: np.ndarray,
    groups: list[str],
    n: int,
    seed: int,
) -> list[dict[str, Any]]:
    section = processor.pipeline.priority
    points: list[tuple[str, dict[str, Any], np.ndarray, float]] = []
    live = processor.loaded.fusion if processor.loaded is not None else None
    levels = resolve_levels(section, live.version.card.study_decision if live else None)
    for lv in levels if not isinstance(levels, str) else fixed_levels(section):
        named = f"operating point {lv.operating_point}, " if lv.operating_point else ""
        points.append(
            (
                f"priority level {lv.priority} ({named}p >= {lv.threshold:g})",
                {
                    "kind": "level",
                    "priority": lv.priority,
                    "min_probability": lv.threshold,
                    "operating_point": lv.operating_point,
                    "flag": lv.flag,
                },
                p,
                lv.threshold,
            )
        )
    if any(lv.flag for lv in section.levels):
        points.append(("flag", {"kind": "flag"}, flags.astype(np.float64), 0.5))
    points.append(
        (
            f"SR positive (p >= {section.sr_threshold:g})",
            {"kind": "sr_threshold", "min_probability": section.sr_threshold},
            p,
            section.sr_threshold,
        )
    )
    out = []
    for name, rule, scores, cut in points:
        est = V.patient_bootstrap(
            {
                "sensitivity": V.at_threshold(M.sensitivity, cut),
                "specificity": V.at_threshold(M.specificity, cut),
            },
            y,
            scores,
            groups,
            n,
            seed,
        )
        out.append(
            {
                "name": name,
                **rule,
                **{k: e.as_dict() for k, e in est.items()},
                **V.counts(y, M.predictions(scores, cut)),
            }
        )
    return out


def summarise(
    results: list[StudyResult],
    processor: PipelineProcessor,
    labels: Path,
    n_resamples: int = V.N_RESAMPLES,
    seed: int = V.SEED,
) -> dict[str, Any]:
    """The content of ``validation.json``: provenance, counts, metrics and per-study rows."""
    scored = [r for r in results if r.state == "SCORED"]
    y = np.asarray([r.label for r in scored], dtype=np.int64)
    p = np.asarray([r.probability for r in scored], dtype=np.float64)
    flags = np.asarray([bool(r.flag) for r in scored])
    groups = [r.patient for r in scored]
    main = V.patient_bootstrap({"auc": M.auc, "ece": V.ece}, y, p, groups, n_resamples, seed)
    refs = sorted({ref for r in scored for ref in r.models.values()})
    return {
        "triaged_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "labels": str(labels),
        "pipeline": {"ref": processor.pipeline.ref, "path": str(processor.pipeline.path or "")},
        "models": _models(processor),
        "models_seen": refs,
        "counts": {
            "studies": len(results),
            "scored": len(scored),
            "skipped": sum(r.state == "SKIPPED" for r in results),
            "failed": sum(r.state == "FAILED" for r in results),
            "patients": len(set(groups)),
            "positives": int(y.sum()),
            "negatives": int(y.size - y.sum()),
            "note": "metrics use scored studies only; skipped and failed studies are excluded",
        },
        "bootstrap": {
            "unit": "patient",
            "resamples": n_resamples,
            "seed": seed,
            "level": V.LEVEL,
            "method": "percentile",
        },
        "metrics": {
            "auc": main["auc"].as_dict(),
            "ece": {**main["ece"].as_dict(), "bins": V.BINS, "binning": "equal-width"},
            "operating_points": _operating_points(
                processor, y, p, flags, groups, n_resamples, seed
            ),
            "reliability": [b.as_dict() for b in V.reliability(y, p)],
        },
        "studies": [asdict(r) for r in results],
    }


def _models(processor: PipelineProcessor) -> list[dict[str, Any]]:
    """Name, version and card identity (weights hash, creation) of the models used last."""
    loaded = processor.loaded
    if loaded is None:
        return []
    return [
        {
            "role": role,
            "name": m.version.name,
            "version": m.version.version,
            "ref": m.version.ref,
            "weights_sha256": m.version.card.weights_sha256,
            "card_created": m.version.card.created.isoformat(),
        }
        for role, m in loaded.models.items()
    ]


def validate(
    settings: Settings,
    labels: Path,
    processor: PipelineProcessor,
    n_resamples: int = V.N_RESAMPLES,
    seed: int = V.SEED,
    quiet: bool = False,
) -> dict[str, Any]:
    """Read the labels, score every study, and return the report (see :func:`summarise`)."""
    rows = read_labels(labels)
    source = StudySource(labels.resolve().parent, settings)
    try:
        results = score_rows(
            rows, source, processor, None if quiet else lambda m: print(m, file=sys.stderr)
        )
    finally:
        source.close()
    return summarise(results, processor, labels, n_resamples, seed)
