"""Before scoring: every file of a study must be the instance it was recorded as.

The SCP refuses an instance that contradicts what is stored, and restart reconcile does
not index a file whose header disagrees with its folder; this is the last check, on the
files a worker is about to read, so that one patient's study is never scored from another
patient's pixels (a file replaced on disk, a row written by an older version).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from triaged.dicom.header import BadInstance, patient_id_of, uid_from_dataset

#: Only what identifies the file: parsing skips everything else.
IDENTITY_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"]


@dataclass(frozen=True)
class RecordedFile:
    """What the database says a spooled file is."""

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    patient_id: str | None  # the study's


def mismatch(expected: RecordedFile) -> str | None:
    """Why the file is not the recorded instance (UIDs only, never patient data), or None.

    A file that cannot be read is left to the scoring pipeline, which reports it and
    cannot take pixels from it either.
    """
    try:
        ds = dcmread(expected.path, stop_before_pixels=True, specific_tags=IDENTITY_TAGS)
    except Exception:  # pydicom raises many kinds on corrupt input
        return None
    sop = expected.sop_instance_uid
    try:
        study, series, found = (uid_from_dataset(ds, k) for k in IDENTITY_TAGS[:3])
    except BadInstance as err:
        return f"file of SOP Instance {sop} is invalid: {err}"
    if study != expected.study_instance_uid:
        return f"file of SOP Instance {sop} belongs to study {study}"
    if series != expected.series_instance_uid:
        return f"file of SOP Instance {sop} belongs to series {series}"
    if found != sop:
        return f"file of SOP Instance {sop} holds SOP Instance {found}"
    if patient_id_of(ds) != expected.patient_id:
        return f"file of SOP Instance {sop} names another Patient ID than its study"
    return None


def first_mismatch(files: Iterable[RecordedFile]) -> str | None:
    """The first file that is not what it was recorded as, or None when all agree."""
    for f in files:
        problem = mismatch(f)
        if problem is not None:
            return problem
    return None
