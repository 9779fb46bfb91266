"""The bridge from a pipeline's ``[series]`` section to ``triaged.dicom.series``.

Series selection and volume building belong to the DICOM layer (``triaged.dicom.series``:
``SeriesRules``, ``select_series``, ``NoEligibleSeries``, ``load_volume``); this module only
turns the pipeline's settings into its rules and expands folders into files, so scoring can
answer ``Skip`` with the DICOM layer's reason when no series fits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from triaged.dicom.series import (
    NoEligibleSeries,
    SeriesChoice,
    SeriesRules,
    Volume,
    load_volume,
    select_series,
)
from triaged.pipeline.definition import SeriesSection

__all__ = ["NoEligibleSeries", "choose_series", "expand", "load_series", "series_rules"]


def expand(sources: Sequence[str | Path] | str | Path) -> list[Path]:
    """Files of ``sources`` (files, or folders searched recursively), sorted, deduplicated."""
    items: Iterable[str | Path] = [sources] if isinstance(sources, (str, Path)) else sources
    files: set[Path] = set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.update(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.add(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return sorted(files)


def series_rules(section: SeriesSection) -> SeriesRules:
    """The DICOM layer's rules from the pipeline's ``[series]`` section (same field names)."""
    values = section.model_dump()
    values["exclude_image_types"] = tuple(values["exclude_image_types"])
    return SeriesRules(**values)


def choose_series(
    sources: Sequence[str | Path] | str | Path, section: SeriesSection
) -> SeriesChoice:
    """The series to score; :class:`NoEligibleSeries` (the DICOM layer's) with the reason."""
    files = expand(sources)
    if not files:
        raise NoEligibleSeries("no eligible series (no files)")
    return select_series(files, series_rules(section))


def load_series(choice: SeriesChoice) -> Volume:
    """The chosen series as a volume (``.hu`` (Z, H, W) in HU, ``.datasets`` in that order)."""
    return load_volume(choice)
