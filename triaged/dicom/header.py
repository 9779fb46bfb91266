"""Read what the worklist needs from an instance's header, never its pixels.

Parsing stops before Pixel Data and large values are skipped (pydicom's ``defer_size``),
so that checking a 500 MB multiframe costs about as much memory as a dose report; the
pixel data and skipped values are checked against the file size by seeking instead.
A deflated dataset is inflated in bounded steps into an unnamed scratch file next to it,
and refused as soon as it grows past the configured limit (a zip bomb never reaches
pydicom, which would inflate it in memory). The patient's name is deliberately not read.
"""

from __future__ import annotations

import copy
import errno
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import RE_VALID_UID, UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from triaged.worklist.studies import InstanceMeta

#: PS3.5 9.1: at most 64 characters.
UID_MAX_CHARS = 64


class BadInstance(Exception):
    """The dataset cannot be used: the reason goes to the log and the failure status."""


class BadIdentifier(BadInstance):
    """A required UID is missing or invalid: the peer gets 0xA900, naming the attribute."""


class TooLarge(BadInstance):
    """Bigger than ``[storage] max_instance_mb`` (on the wire or inflated) or than the free
    space: the SCP's resources, not the data, are at fault, so the answer is 0xA700."""


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
        raise BadIdentifier(f"missing {keyword}")
    problem = uid_problem(value)
    if problem is not None:
        raise BadIdentifier(f"invalid {keyword}: {problem}")
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


#: Values longer than this are not read into memory while the header is parsed.
DEFER_BYTES = 64 * 1024
#: Inflate step: compressed input read and inflated output produced at a time.
CHUNK = 1024 * 1024
UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
#: explicit VRs with a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)


def _check_values(ds: Dataset, size: int) -> None:
    """Refuse a top-level value shorter than its declared length (pydicom accepts those)."""
    for elem in ds._dict.values():  # raw elements: values not yet converted
        length = getattr(elem, "length", None)
        if length is None or length == UNDEFINED:
            continue
        value = getattr(elem, "value", None)
        tell = getattr(elem, "value_tell", None)
        if value is None and tell is not None and length and tell + length > size:
            raise BadInstance(f"truncated dataset: element {elem.tag} is short")  # deferred
        if isinstance(value, bytes) and len(value) < length:
            raise BadInstance(f"truncated dataset: element {elem.tag} is short")


def _pixel_header(fh: BinaryIO, implicit: bool, little: bool) -> tuple[int, int] | None:
    """(tag, length) of the pixel data element at the file position, None if there is none."""
    order = "<" if little else ">"
    head = fh.read(8)
    if len(head) < 8:
        return None
    group, elem = struct.unpack(order + "HH", head[:4])
    if (group << 16 | elem) not in _PIXEL_TAGS:
        return None
    vr = head[4:6]
    if implicit or not (vr.isalpha() and vr.isupper()):  # some writers switch to implicit
        return group << 16 | elem, struct.unpack(order + "L", head[4:])[0]
    if vr in _LONG_VRS:
        rest = fh.read(4)
        if len(rest) < 4:
            raise BadInstance("truncated dataset: pixel data header is cut")
        return group << 16 | elem, struct.unpack(order + "L", rest)[0]
    return group << 16 | elem, struct.unpack(order + "H", head[6:8])[0]


def _walk_fragments(fh: BinaryIO, size: int, little: bool) -> int:
    """Count encapsulated items by seeking from header to header; refuse a cut sequence."""
    order = "<" if little else ">"
    items = 0
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise BadInstance("truncated dataset: pixel data fragments end early")
        group, elem, length = struct.unpack(order + "HHL", head)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return items
        if tag != _ITEM or length == UNDEFINED:
            raise BadInstance(f"truncated dataset: unexpected tag {tag:08X} in pixel data")
        if fh.tell() + length > size:
            raise BadInstance("truncated dataset: a pixel data fragment runs past the end")
        fh.seek(length, os.SEEK_CUR)
        items += 1


def check_complete(ds: Dataset, fh: BinaryIO, size: int) -> None:
    """Refuse a dataset that ended early, without reading its pixel data.

    ``ds`` was parsed from ``fh`` with ``stop_before_pixels``, so ``fh`` stands at the
    pixel data element if there is one. A dataset cut on the wire or on disk shows as a
    top-level value shorter than its declared length, an image without pixel data, pixel
    data declared longer than what is left of the file or shorter than rows x columns x
    samples x frames, or encapsulated fragments that run past the end.
    """
    _check_values(ds, size)
    implicit, little = ds.original_encoding
    little = little is not False  # unknown: little endian, as every syntax received but one
    found = _pixel_header(fh, bool(implicit), little)
    is_image = "Image Storage" in ds.SOPClassUID.name if "SOPClassUID" in ds else False
    if found is None:
        if "Rows" in ds or is_image:
            raise BadInstance("truncated dataset: image without pixel data")
        return
    tag, length = found
    if length == UNDEFINED:
        if _walk_fragments(fh, size, little) < 2:  # offset table + at least one
            raise BadInstance("truncated dataset: no pixel data fragments")
        return
    if fh.tell() + length > size:
        raise BadInstance("truncated dataset: pixel data shorter than declared")
    ts = ds.file_meta.get("TransferSyntaxUID")
    if tag != 0x7FE00010 or (ts is not None and UID(ts).is_compressed):
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames
    if length < (n * int(ds.BitsAllocated) + 7) // 8:
        raise BadInstance("truncated dataset: pixel data shorter than the image")


def _inflate(src: BinaryIO, meta: FileMetaDataset, limit: int, scratch: Path) -> BinaryIO:
    """An unnamed file holding the inflated dataset as Explicit VR Little Endian Part 10.

    Inflates at most ``CHUNK`` bytes per step, so memory stays flat, and stops with
    TooLarge as soon as the output passes ``limit`` bytes.
    """
    out = tempfile.TemporaryFile(dir=scratch)  # noqa: SIM115 - returned to the caller
    try:
        out.write(b"\0" * 128 + b"DICM")
        plain = copy.deepcopy(meta)
        plain.TransferSyntaxUID = ExplicitVRLittleEndian
        encoded = DicomBytesIO()
        write_file_meta_info(encoded, plain)
        out.write(encoded.getvalue())
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while not inflater.eof:
            data = inflater.unconsumed_tail or src.read(CHUNK)
            if not data:
                raise BadInstance("truncated dataset: deflated data ends early")
            chunk = inflater.decompress(data, CHUNK)
            total += len(chunk)
            if limit and total > limit:
                raise TooLarge(f"too large: inflated dataset above {limit // (1024 * 1024)} MB")
            out.write(chunk)
        out.flush()
        out.seek(0)
        return out
    except zlib.error as err:
        out.close()
        raise BadInstance(f"cannot inflate dataset: {err}"[:120]) from None
    except OSError as err:
        out.close()
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TooLarge("out of space: no room to inflate the dataset") from None
        raise
    except BaseException:
        out.close()
        raise


def _parse(fh: BinaryIO, size: int) -> Dataset:
    ds = dcmread(fh, stop_before_pixels=True, defer_size=DEFER_BYTES)
    check_complete(ds, fh, size)
    return ds


def read_meta(path: Path, max_bytes: int = 0) -> InstanceMeta:
    """Parse a Part 10 file's header and check it is whole; BadInstance if it is not usable.

    ``max_bytes`` (0: no limit) caps the size of a deflated dataset once inflated.
    """
    try:
        meta = read_file_meta_info(path)
        ts = meta.get("TransferSyntaxUID")
        if not ts:
            raise BadInstance("no transfer syntax in file meta")
        with open(path, "rb") as fh:  # open while fields are read: skipped values load lazily
            if ts != DeflatedExplicitVRLittleEndian:
                return meta_from_dataset(_parse(fh, os.fstat(fh.fileno()).st_size), str(ts))
            fh.seek(_dataset_offset(fh))
            with _inflate(fh, meta, max_bytes, path.parent) as plain:
                ds = _parse(plain, os.fstat(plain.fileno()).st_size)
                return meta_from_dataset(ds, str(ts))
    except BadInstance:
        raise
    except Exception as err:  # pydicom raises many kinds on corrupt input
        # The exception's text may quote a value of the dataset (patient data): name its kind.
        raise BadInstance(f"cannot parse dataset: {type(err).__name__}") from None


def _dataset_offset(fh: BinaryIO) -> int:
    """Where the dataset starts: after the preamble and the File Meta group (0002)."""
    fh.seek(132)
    while True:
        pos = fh.tell()
        head = fh.read(8)
        if len(head) < 8:
            return pos
        group, _elem = struct.unpack("<HH", head[:4])
        if group != 0x0002:
            return pos
        if head[4:6] in _LONG_VRS:
            length = struct.unpack("<L", fh.read(4))[0]
        else:
            length = struct.unpack("<H", head[6:8])[0]
        fh.seek(length, os.SEEK_CUR)
