"""Read what the worklist needs from an instance's header, never its pixels.

Parsing stops before Pixel Data so that receiving costs the same for a 512x512 CT slice
and for a dose report; the patient's name is deliberately not read.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triaged.dicom.spool import valid_uid
from triaged.worklist.studies import InstanceMeta

_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
    "RequestedProcedurePriority",
    "RequestAttributesSequence",
]


class BadInstance(Exception):
    """The dataset cannot be used: the reason goes to the log and the failure status."""


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _priority(ds: Dataset) -> str | None:
    """The requested procedure priority (STAT, HIGH, ROUTINE, MEDIUM, LOW) if the PACS sent one."""
    direct = _text(ds, "RequestedProcedurePriority", 16)
    if direct:
        return direct.upper()
    for item in ds.get("RequestAttributesSequence", []) or []:
        value = _text(item, "RequestedProcedurePriority", 16)
        if value:
            return value.upper()
    return None


def meta_from_dataset(ds: Dataset, transfer_syntax_uid: str) -> InstanceMeta:
    """Validate the identifying UIDs and collect the worklist fields."""
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds, keyword)
        if not value:
            raise BadInstance(f"missing {keyword}")
        if not valid_uid(value):
            raise BadInstance(f"invalid {keyword}")
        uids[keyword] = value
    return InstanceMeta(
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        patient_id=_text(ds, "PatientID"),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 128),
        requested_priority=_priority(ds),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 128),
        instance_number=_int(ds, "InstanceNumber"),
    )


def read_meta(path: Path) -> InstanceMeta:
    """Parse a Part 10 file's header; BadInstance if it is not usable DICOM."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as err:
        raise BadInstance(f"cannot parse dataset: {type(err).__name__}: {err}"[:200]) from None
    except Exception as err:  # pydicom raises many kinds on corrupt input
        raise BadInstance(f"cannot parse dataset: {type(err).__name__}"[:200]) from None
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not ts:
        raise BadInstance("no transfer syntax in file meta")
    try:
        return meta_from_dataset(ds, str(ts))
    except BadInstance:
        raise
    except Exception as err:
        raise BadInstance(f"cannot read header: {type(err).__name__}: {err}"[:200]) from None
