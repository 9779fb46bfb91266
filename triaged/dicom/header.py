"""Read what the worklist needs from an instance's header, never its pixels.

Parsing stops before Pixel Data so that receiving costs the same for a 512x512 CT slice
and for a dose report; the patient's name is deliberately not read.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import RE_VALID_UID

from triaged.worklist.studies import InstanceMeta

#: PS3.5 9.1: at most 64 characters.
UID_MAX_CHARS = 64


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


def uid_problem(uid: str) -> str | None:
    """Why ``uid`` is not a DICOM UID (PS3.5 9.1), or None when it is one.

    Components are digits without a leading zero (unless the component is "0"), separated
    by single dots, at most 64 characters in all. Checked on the whole value: cutting a
    long UID to 64 characters would merge different instances or studies.
    """
    if not uid:
        return "empty"
    if len(uid) > UID_MAX_CHARS:
        return f"longer than {UID_MAX_CHARS} characters"
    if RE_VALID_UID.match(uid):
        return None
    parts = uid.split(".")
    if not all(part.isascii() and part.isdigit() for part in parts):
        return "not digits separated by dots"
    return "a component has a leading zero"


def _raw_uid(ds: Dataset, keyword: str) -> str | None:
    """The value of a UID attribute as sent, only its trailing padding removed.

    Read from the undecoded bytes where possible; NUL is the standard's padding and a
    trailing space is tolerated (common, harmless). Multiple values are kept joined by
    the backslash so that they fail validation.
    """
    if keyword not in ds:
        return None
    value = ds.get_item(keyword).value
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    if isinstance(value, str):
        return value.rstrip("\x00 ")
    return "\\".join(str(v) for v in value)  # a MultiValue


def uid_from_dataset(ds: Dataset, keyword: str) -> str:
    """A required, valid UID attribute; BadInstance naming the attribute otherwise."""
    value = _raw_uid(ds, keyword)
    if not value:
        raise BadInstance(f"missing {keyword}")
    problem = uid_problem(value)
    if problem is not None:
        raise BadInstance(f"invalid {keyword}: {problem}")
    return value


def patient_id_of(ds: Dataset) -> str | None:
    """The Patient ID as the worklist stores and compares it."""
    return _text(ds, "PatientID")


def meta_from_dataset(ds: Dataset, transfer_syntax_uid: str) -> InstanceMeta:
    """Validate the identifying UIDs (whole values, before anything is cut) and collect the
    worklist fields."""
    uids = {
        keyword: uid_from_dataset(ds, keyword)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    }
    return InstanceMeta(
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        patient_id=patient_id_of(ds),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 128),
        requested_priority=_priority(ds),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 128),
        instance_number=_int(ds, "InstanceNumber"),
    )


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED = 0xFFFFFFFF


def check_complete(ds: Dataset) -> None:
    """Refuse a dataset that ended early: pydicom silently accepts truncated values.

    A dataset cut on the wire or on disk shows as a top-level value shorter than its
    declared length, an image without its pixel data, native pixel data shorter than
    rows x columns x samples x frames, or encapsulated pixel data whose fragments run
    past the end.
    """
    for elem in ds._dict.values():  # raw elements: values not yet converted
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if (
            isinstance(value, bytes)
            and length is not None
            and length != UNDEFINED
            and len(value) < length
        ):
            raise BadInstance(f"truncated dataset: element {elem.tag} is short")
    is_image = "Image Storage" in ds.SOPClassUID.name if "SOPClassUID" in ds else False
    if ("Rows" in ds or is_image) and not any(k in ds for k in _PIXEL_KEYWORDS):
        raise BadInstance("truncated dataset: image without pixel data")
    if "PixelData" not in ds:
        return
    ts = ds.file_meta.TransferSyntaxUID
    data = ds.PixelData
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not ts.is_compressed:
        bits = int(ds.BitsAllocated)
        n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
        expected = (n * bits + 7) // 8
        if len(data) < expected:
            raise BadInstance("truncated dataset: pixel data shorter than the image")
        return
    try:
        fragments = list(generate_fragments(data))
    except (ValueError, EOFError) as err:
        raise BadInstance(f"truncated dataset: {err}"[:120]) from None
    if not fragments:
        raise BadInstance("truncated dataset: no pixel data fragments")


def read_meta(path: Path) -> InstanceMeta:
    """Parse a Part 10 file and check it is whole; BadInstance if it is not usable DICOM."""
    try:
        ds = dcmread(path)
        check_complete(ds)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if not ts:
            raise BadInstance("no transfer syntax in file meta")
        return meta_from_dataset(ds, str(ts))
    except BadInstance:
        raise
    except Exception as err:  # pydicom raises many kinds on corrupt input
        raise BadInstance(f"cannot parse dataset: {type(err).__name__}: {err}"[:200]) from None
