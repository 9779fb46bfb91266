"""DICOM writing of the phantom: deterministic UIDs, the patient/study/series modules, CT
Image and Secondary Capture instances that pass ``dciodvfy``, and the transfer syntaxes.

Requested priority: the order's priority is written as Requested Procedure Priority
(0040,1003) inside the Request Attributes Sequence (0040,0275) item of the General Series
module (the standard's place for order information in an image) *and* at the top level of
the dataset, where many RIS/PACS integrations put it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import format_number_as_ds

from triaged.pipeline.hu import window_hu

SUPPORTED_TRANSFER_SYNTAXES: dict[str, UID] = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "ImplicitVRLittleEndian": ImplicitVRLittleEndian,
    "DeflatedExplicitVRLittleEndian": DeflatedExplicitVRLittleEndian,
    "RLELossless": RLELossless,
    "JPEGLSLossless": JPEGLSLossless,
    "JPEG2000Lossless": JPEG2000Lossless,
}
"""Transfer syntaxes ``generate_study`` can write, by pydicom keyword (UIDs are accepted too)."""

_COMPRESSED = {RLELossless, JPEGLSLossless, JPEG2000Lossless}

RESCALE_INTERCEPT = -1024
_SYNTHETIC_NAME = "SYNTHETIC^PHANTOM"


def uid_for(*parts: object) -> UID:
    """A deterministic UID (2.25 form) from the arguments that define the object.

    pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random, so
    the 128-bit integer comes from a SHA-256 of the parts instead.
    """
    text = "\x1f".join(["triaged-synthetic", *map(str, parts)])
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")
    return UID(f"2.25.{value}")


def resolve_transfer_syntax(transfer_syntax: str | None) -> UID:
    if transfer_syntax is None:
        return ExplicitVRLittleEndian
    if transfer_syntax in SUPPORTED_TRANSFER_SYNTAXES:
        return SUPPORTED_TRANSFER_SYNTAXES[transfer_syntax]
    uid = UID(transfer_syntax)
    if uid not in SUPPORTED_TRANSFER_SYNTAXES.values():
        names = ", ".join(SUPPORTED_TRANSFER_SYNTAXES)
        raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}; use one of {names}")
    return uid


def _ds_string(value: float) -> str:
    """A Decimal String of at most 16 characters, as precise as that allows."""
    return format_number_as_ds(float(value))


@dataclass(frozen=True)
class StudyInfo:
    study_uid: str
    frame_uid: str
    patient_id: str
    accession: str
    study_date: str
    study_time: str
    study_id: str
    priority: str | None


def _patient_study(ds: Dataset, info: StudyInfo) -> None:
    """Patient, General Study, Patient Study and the shared General Equipment attributes."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = _SYNTHETIC_NAME
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "SYNTHETIC PHANTOM, NO REAL PATIENT"
    ds.StudyInstanceUID = info.study_uid
    ds.StudyDate = info.study_date
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = info.study_id
    ds.AccessionNumber = info.accession
    ds.StudyDescription = "SYNTHETIC CHEST CT PHANTOM"
    ds.PatientAge = "050Y"
    ds.Manufacturer = "SYNTHETIC PHANTOM (triaged test data)"
    ds.InstitutionName = "SYNTHETIC"
    ds.ManufacturerModelName = "synthetic chest phantom"
    ds.SoftwareVersions = "triaged.synthetic 1"
    if info.priority is not None:
        ds.RequestedProcedurePriority = info.priority
    request = Dataset()
    request.AccessionNumber = info.accession
    request.RequestedProcedureID = info.accession
    request.ScheduledProcedureStepID = info.accession
    request.RequestedProcedureDescription = "SYNTHETIC CT CHEST"
    if info.priority is not None:
        request.RequestedProcedurePriority = info.priority
    ds.RequestAttributesSequence = DicomSequence([request])


def _series_attrs(
    ds: Dataset, info: StudyInfo, series_uid: str, number: int, description: str, modality: str
) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDate = info.study_date
    ds.SeriesTime = info.study_time
    ds.SeriesDescription = description
    ds.ProtocolName = "SYNTHETIC CHEST"
    ds.BodyPartExamined = "CHEST"


def _time_plus(hhmmss: str, seconds: float) -> str:
    h, m, s = int(hhmmss[0:2]), int(hhmmss[2:4]), int(hhmmss[4:6])
    total = (h * 3600 + m * 60 + s + seconds) % 86400
    hh, rem = divmod(total, 3600)
    mm, ss = divmod(rem, 60)
    return f"{int(hh):02d}{int(mm):02d}{ss:09.6f}"


def ct_slice(
    info: StudyInfo,
    *,
    series_uid: str,
    series_number: int,
    description: str,
    instance: int,
    hu: np.ndarray,
    pixel_spacing: tuple[float, float],
    orientation: Sequence[float],
    position: Sequence[float],
    thickness: float,
    spacing_between: float | None,
    image_type: Sequence[str],
    acquisition: int,
    content_seconds: float,
    tilt: float = 0.0,
    temporal_index: int | None = None,
    contrast: bool = False,
    signed: bool = False,
) -> Dataset:
    """One CT Image Storage instance with every module dciodvfy expects."""
    ds = Dataset()
    sop_uid = uid_for(series_uid, "instance", instance)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = info.study_date
    ds.InstanceCreationTime = info.study_time
    _patient_study(ds, info)
    _series_attrs(ds, info, series_uid, series_number, description, "CT")
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = info.frame_uid
    ds.PositionReferenceIndicator = ""
    # General Image / General Acquisition
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = acquisition
    time = _time_plus(info.study_time, content_seconds)
    ds.AcquisitionDate = info.study_date
    ds.AcquisitionTime = time
    ds.ContentDate = info.study_date
    ds.ContentTime = time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = "SYNTHETIC PHANTOM - NOT A PATIENT"
    if temporal_index is not None:
        ds.TemporalPositionIndex = temporal_index
    # Image Plane
    ds.PixelSpacing = [_ds_string(pixel_spacing[0]), _ds_string(pixel_spacing[1])]
    ds.ImageOrientationPatient = [_ds_string(v) for v in orientation]
    ds.ImagePositionPatient = [_ds_string(v) for v in position]
    ds.SliceThickness = _ds_string(thickness)
    if spacing_between is not None:
        ds.SpacingBetweenSlices = _ds_string(spacing_between)
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    ds.SliceLocation = _ds_string(float(np.dot(normal, np.asarray(position, float))))
    # Contrast/Bolus (required when contrast was given)
    if contrast:
        ds.ContrastBolusAgent = "SYNTHETIC IODINATED CONTRAST"
        ds.ContrastBolusRoute = "IV"
    # CT Image
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds_string(pixel_spacing[1] * hu.shape[1])
    ds.GantryDetectorTilt = _ds_string(tilt)
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.ConvolutionKernel = "SYNTHETIC"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    if "LOCALIZER" not in image_type:  # a scout's values are not calibrated HU
        ds.RescaleType = "HU"
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(hu.shape[0]), int(hu.shape[1])
    ds.BitsAllocated = 16
    stored = hu.astype(np.int32) - RESCALE_INTERCEPT
    if signed:
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = stored.astype("<i2").tobytes()
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def write_file(ds: Dataset, path: Path, transfer_syntax: UID) -> Path:
    """Write with File Meta Information; compress the pixel data when the syntax asks."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if transfer_syntax in _COMPRESSED:
        ds.compress(transfer_syntax, generate_instance_uid=False)
        if transfer_syntax != RLELossless:
            ds.LossyImageCompression = "00"
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def sc_instance(
    info: StudyInfo, series_uid: str, hu: np.ndarray, pixel_spacing: tuple[float, float]
) -> Dataset:
    """A Secondary Capture (a lung-window screenshot), as a PACS study often holds one."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid_for(series_uid, "instance", 1)
    ds.InstanceCreationDate = info.study_date
    ds.InstanceCreationTime = info.study_time
    _patient_study(ds, info)
    _series_attrs(ds, info, series_uid, 90, "SYNTHETIC SCREEN CAPTURE", "OT")
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "P"]
    ds.ContentDate = info.study_date
    ds.ContentTime = info.study_time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = "SYNTHETIC PHANTOM - NOT A PATIENT"
    ds.PixelSpacing = [_ds_string(pixel_spacing[0]), _ds_string(pixel_spacing[1])]
    img = (window_hu(hu) * 255.0).astype(np.uint8)  # truncated, as the bytes always were
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    return ds
