"""The bridge from a pipeline's ``[series]`` section to ``triaged.dicom.series``.

Series selection and volume building belong to the DICOM layer (``triaged.dicom.series``:
``choose_series`` returns the ``SeriesChoice`` or the ``NoEligibleSeries`` with the reason,
``load_volume``); this module only turns the pipeline's settings into its rules and expands
folders into files. Scoring and training (``triaged.training.dicom_data``) both call
``choose_series(expand(sources), series_rules(section))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from triaged.dicom.series import SeriesRules
from triaged.pipeline.definition import SeriesSection

__all__ = ["expand", "series_rules"]


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
