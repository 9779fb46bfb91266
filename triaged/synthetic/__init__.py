"""Synthetic chest-CT studies written as real DICOM, for tests and the demo.

Real chest CTs cannot ship with the code or run in CI, yet every layer (SCP, spool, series
selection, scoring, results) needs studies that look and behave like a scanner's output.
This module draws a deterministic chest phantom (body, fat, muscle, two lungs around a
mediastinum and heart, pulmonary vessels, spine, ribs, table; optionally COVID-like
ground-glass opacities and consolidation with their ground-truth mask) and writes it as
CT Image Storage instances that pass ``dciodvfy`` without error.

Geometry follows the patient coordinate system (LPS): supine, head first, image rows run
from anterior to posterior, columns from the patient's right to left, and slice index 0 of
every volume is the most inferior (feet) slice, with z increasing towards the head.

Everything is generated from ``seed``: the same arguments give byte-identical files,
UIDs included (UIDs are derived from the arguments, so do not reuse a seed for two
studies that must coexist in one archive).

The package keeps each job in its module: :mod:`.phantom` draws the anatomy,
:mod:`.writing` writes DICOM, :mod:`.study` assembles the series of a study (a table of
the extra series kinds).

Requested priority: the order's priority is written as Requested Procedure Priority
(0040,1003) inside the Request Attributes Sequence (0040,0275) item of the General Series
module (the standard's place for order information in an image) *and* at the top level of
the dataset, where many RIS/PACS integrations put it; readers should try the top level
first, then ``RequestAttributesSequence[0]``. Values: STAT, HIGH, ROUTINE, MEDIUM, LOW.
"""

from __future__ import annotations

from triaged.synthetic.phantom import (
    FIELD_OF_VIEW_MM,
    HU_MAX,
    HU_MIN,
    generate_slices,
    phantom_volume,
)
from triaged.synthetic.study import (
    EXTRA_SERIES,
    SERIES_KINDS,
    THICK_FACTOR,
    TILT_DEGREES,
    SyntheticSeries,
    SyntheticStudy,
    generate_study,
)
from triaged.synthetic.writing import RESCALE_INTERCEPT, SUPPORTED_TRANSFER_SYNTAXES

__all__ = [
    "EXTRA_SERIES",
    "FIELD_OF_VIEW_MM",
    "HU_MAX",
    "HU_MIN",
    "RESCALE_INTERCEPT",
    "SERIES_KINDS",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "THICK_FACTOR",
    "TILT_DEGREES",
    "SyntheticSeries",
    "SyntheticStudy",
    "generate_slices",
    "generate_study",
    "phantom_volume",
]
