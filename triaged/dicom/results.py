"""The DICOM result objects triaged writes back into the scored study.

Three objects, all built with highdicom in the source study (same Study Instance UID, Patient and
Study modules copied from the source CT), each in its own new series:

* a Comprehensive 3D SR holding a TID 1500 Measurement Report: the finding COVID-19
  (SNOMED CT 840539006), the fusion and CBAM probabilities (TID 300 measurements), the
  present/absent evaluation at the pipeline threshold, the algorithms (TID 4019) and the
  evidence slices;
* a Secondary Capture of the key slice in the lung window with the heat-map blended in colour and
  "NOT FOR DIAGNOSTIC USE" burned into the pixels (BurnedInAnnotation YES);
* a binary Segmentation of the infected regions, one frame per source slice that has any.

Everything here is pure (datasets in, datasets out): no file or network I/O, so the worker and
the tests call it alike. UIDs are derived from the study, a caller's ``result_key`` (a job id)
and the object's role, so a retried job resends the very same SOP Instance UIDs and a PACS
stores it once.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from triaged import __version__
from triaged.pipeline.hu import LUNG_WINDOW, slice_hu, window_uint8

MANUFACTURER = "triaged"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

#: SNOMED CT 840539006 "Disease caused by severe acute respiratory syndrome coronavirus 2".
COVID19 = Code("840539006", "SCT", "COVID-19")
#: The study procedure the report is about (CID 100 is extensible).
CT_CHEST = Code("169069000", "SCT", "Computed tomography of chest")
PROBABILITY = codes.DCM.Probability
#: UCUM unity: a probability is a dimensionless ratio in [0, 1].
UNITY = codes.UCUM.NoUnits
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
#: Segmented property (CID 7150 / CID 7151): the infected regions are lesions of the lung.
LESION_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
LESION_TYPE = codes.SCT.Lesion
LUNG = codes.SCT.Lung
COMMENT = codes.DCM.Comment  # (121106, DCM, "Comment")
#: DCM 121322 "Source image for image processing operation" (CID 7202).
SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")

#: Lung window of the Secondary Capture (width, level) in HU.
#: The Secondary Capture is drawn at least this wide so that the burned-in text stays legible.
MIN_CAPTURE_SIZE = 512
#: Heat-map values below this stay transparent so that the anatomy remains readable.
HEATMAP_FLOOR = 0.1
HEATMAP_OPACITY = 0.55

#: Default series numbers of the three result series (high, to sort after the acquisitions).
SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "seg": 9903}

#: Namespace of triaged's name-based UUIDs (itself a name-based UUID, fixed forever).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:triaged:dicom-results")


@dataclass(frozen=True)
class ModelInfo:
    """Identity of one scoring model as recorded in the outputs (name and registry version)."""

    name: str
    version: str


@dataclass(frozen=True)
class StudyFindings:
    """What the pipeline concluded about one study; the input of :func:`build_results`.

    Indices refer to positions in the ``source_datasets`` passed to :func:`build_results`
    (the selected axial series in sorted order).
    """

    fusion_probability: float
    cbam_probability: float | None
    threshold: float
    positive: bool
    key_slice_index: int
    heatmap: np.ndarray
    infected_masks: dict[int, np.ndarray]
    model: ModelInfo
    cbam_model: ModelInfo | None
    evidence_indices: Sequence[int] = field(default_factory=tuple)
    comment: str | None = None  # why the score should not be trusted (out of distribution)
    # study decision (issue 12): set when the probability is calibrated on validation studies
    operating_point: str | None = None  # the fitted operating point that fired
    calibrated_on: int | None = None  # number of validation studies
    raw_probability: float | None = None  # the aggregate before calibration

    def __post_init__(self) -> None:
        """Refuse findings that cannot be written as valid DICOM."""
        for label, value in (
            ("fusion_probability", self.fusion_probability),
            ("cbam_probability", self.cbam_probability),
            ("threshold", self.threshold),
        ):
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{label} must be in [0, 1], got {value!r}")
        if (self.cbam_probability is None) != (self.cbam_model is None):
            raise ValueError("cbam_probability and cbam_model must be given together")
        if self.heatmap.ndim != 2:
            raise ValueError(f"heatmap must be 2-D (rows, cols), got shape {self.heatmap.shape}")
        for index, mask in self.infected_masks.items():
            if mask.ndim != 2:
                raise ValueError(f"infected mask of slice {index} must be 2-D")


@dataclass(frozen=True)
class ResultObjects:
    """The datasets to deliver; ``seg`` is None when no pixel was found infected."""

    sr: hd.sr.Comprehensive3DSR
    sc: hd.sc.SCImage
    seg: hd.seg.Segmentation | None

    def datasets(self) -> list[pydicom.Dataset]:
        """All objects that exist, in delivery order."""
        return [ds for ds in (self.sr, self.sc, self.seg) if ds is not None]


def deterministic_uid(*parts: str, uid_root: str | None = None) -> str:
    """A UID that is a pure function of ``parts``, so a retried job reproduces it.

    Without ``uid_root`` it is a name-based (version 5) UUID under the ``2.25`` arc
    (PS3.5 B.2; pydicom's ``generate_uid(prefix=None)`` would ignore the entropy and be random);
    with it, pydicom hashes the parts under the organisation's root (which ends in ".").
    """
    if not parts:
        raise ValueError("deterministic_uid needs at least one entropy source")
    # A separator that cannot occur in UIDs or job ids keeps ("ab", "c") apart from ("a", "bc").
    name = "\x1f".join(("triaged", *parts))
    if uid_root is None:
        return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"
    return str(generate_uid(prefix=uid_root, entropy_srcs=[name]))


def _software_versions(findings: StudyFindings) -> list[str]:
    """SoftwareVersions values; a list, since pydicom refuses tuples for multi-valued LO."""
    versions = [f"triaged {__version__}", f"{findings.model.name} {findings.model.version}"]
    if findings.cbam_model is not None:
        versions.append(f"{findings.cbam_model.name} {findings.cbam_model.version}")
    return [v[:64] for v in versions]


def _patient_orientation(ds: pydicom.Dataset) -> tuple[str, str]:
    """Patient Orientation letters of the row and column directions (dominant axis only)."""
    cosines = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def letter(vector: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][0] if vector[axis] >= 0 else letters[axis][1]

    return letter(cosines[:3]), letter(cosines[3:])


def heat_colours(heatmap: np.ndarray) -> np.ndarray:
    """Map [0, 1] to a blue-cyan-yellow-red ramp (jet-like), shape (..., 3) uint8."""
    h = np.clip(heatmap.astype(np.float64), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue peak positions
    rgb: np.ndarray = np.clip(1.5 - np.abs(4.0 * (h - centres)), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def _fitting_font(
    draw: ImageDraw.ImageDraw, text: str, max_width: int, size: int
) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The default font at the largest size <= ``size`` whose rendering of ``text`` fits."""
    while True:
        font = ImageFont.load_default(size=size)
        left, _, right, _ = draw.textbbox((0, 0), text, font=font)
        if right - left <= max_width or size <= 6:
            return font
        size -= 1


def render_key_slice(
    hu: np.ndarray,
    heatmap: np.ndarray,
    *,
    captions: Sequence[str] = (),
    window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """Draw the key slice for the Secondary Capture: lung window, heat-map, burned-in text.

    The first caption goes at the top, the others at the bottom; with no captions the result is
    the plain overlay (what tests compare against to see that text was burned in). Small images
    are enlarged by an integer factor first, so the text never covers the whole slice.
    ``window`` is (level, width) in HU. Returns an RGB uint8 array of shape (rows * f, cols * f, 3).
    """
    if hu.shape != heatmap.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} != slice shape {hu.shape}")
    grey = window_uint8(hu, *window).astype(np.float64)[..., None]
    h = np.clip(np.nan_to_num(heatmap.astype(np.float64)), 0.0, 1.0)
    alpha = np.where(h >= HEATMAP_FLOOR, HEATMAP_OPACITY * h, 0.0)[..., None]
    blended = grey * (1.0 - alpha) + heat_colours(h).astype(np.float64) * alpha
    rgb = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    rows, cols = hu.shape
    factor = max(1, math.ceil(MIN_CAPTURE_SIZE / max(rows, cols)))
    image = Image.fromarray(rgb, mode="RGB")
    if factor > 1:
        image = image.resize((cols * factor, rows * factor), Image.Resampling.BILINEAR)
    if captions:
        draw = ImageDraw.Draw(image)
        width, height = image.size
        margin = max(4, width // 64)
        size = max(10, width // 20)
        y_top = margin
        for i, text in enumerate(captions):
            font = _fitting_font(draw, text, width - 2 * margin, size if i == 0 else size * 2 // 3)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            x = (width - (right - left)) // 2 - left
            if i == 0:
                y = y_top - top
            else:
                line_height = bottom - top + margin // 2
                y = height - margin - line_height * (len(captions) - i) - top
            draw.text(
                (x, y),
                text,
                font=font,
                fill=(255, 255, 0),
                stroke_width=max(1, size // 12),
                stroke_fill=(0, 0, 0),
            )
    return np.asarray(image, dtype=np.uint8).copy()


def _check_sources(source_datasets: Sequence[pydicom.Dataset], findings: StudyFindings) -> None:
    if not source_datasets:
        raise ValueError("no source datasets")
    study_uids = {str(ds.StudyInstanceUID) for ds in source_datasets}
    if len(study_uids) != 1:
        raise ValueError(f"source datasets span {len(study_uids)} studies")
    n = len(source_datasets)
    indices = [findings.key_slice_index, *findings.evidence_indices, *findings.infected_masks]
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"slice indices {sorted(set(bad))} outside the {n} source datasets")
    key = source_datasets[findings.key_slice_index]
    if findings.heatmap.shape != (key.Rows, key.Columns):
        raise ValueError(
            f"heatmap shape {findings.heatmap.shape} != key slice ({key.Rows}, {key.Columns})"
        )
    for index, mask in findings.infected_masks.items():
        ds = source_datasets[index]
        if mask.shape != (ds.Rows, ds.Columns):
            raise ValueError(f"infected mask of slice {index} does not match its image size")


#: Type 2 Patient and General Study attributes; empty when the source lacks them (anonymised
#: studies often do), since highdicom's SR constructor reads them unconditionally.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def _header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The source instance without its pixels, with missing Type 2 patient/study made empty.

    References need only the header; leaving the caller's dataset untouched keeps this pure.
    """
    header = pydicom.Dataset()
    for element in ds:
        if element.tag not in _PIXEL_TAGS:
            header.add(element)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _algorithm_parameters(findings: StudyFindings) -> dict[str, str]:
    """TID 4019 parameters: the SR threshold and, when calibrated, what decided the priority."""
    params = {"threshold": f"{findings.threshold:.4g}"}
    if findings.calibrated_on is not None:
        params["operating_point"] = findings.operating_point or "none reached"
        params["calibration"] = f"calibrated on {findings.calibrated_on} validation studies"
        if findings.raw_probability is not None:
            params["raw_probability"] = f"{findings.raw_probability:.4g}"
    return params


def _new_object(
    findings: StudyFindings,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    institution_name: str | None,
) -> dict[str, Any]:
    """The keyword arguments every result object shares: its identity and its maker."""
    return {
        "series_instance_uid": series_instance_uid,
        "series_number": series_number,
        "sop_instance_uid": sop_instance_uid,
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": findings.model.name[:64],
        "institution_name": institution_name,
    }


def build_report(
    source_datasets: Sequence[pydicom.Dataset],
    findings: StudyFindings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    tracking_uid: str,
    device_uid: str,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report of the study's COVID-19 probability.

    One TID 1501 measurement group: finding type COVID-19, the fusion probability and (when
    scored) the CBAM probability as TID 300 measurements, each naming its own model, and a
    Present/Absent evaluation at the threshold; the evidence slices are its source images.
    """
    evidence_indices = sorted({*findings.evidence_indices, findings.key_slice_index})
    evidence = [_header(source_datasets[i]) for i in evidence_indices]
    parameters = [f"{k}={v}" for k, v in _algorithm_parameters(findings).items()]

    def algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=model.name, version=model.version, manufacturer=MANUFACTURER
        )

    # The group's algorithm is the pipeline that decided Present/Absent (with its threshold);
    # each probability names the model that produced it.
    pipeline = hd.sr.AlgorithmIdentification(
        name=MANUFACTURER,
        version=__version__,
        parameters=parameters,
        manufacturer=MANUFACTURER,
    )
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY,
            value=float(findings.fusion_probability),
            unit=UNITY,
            algorithm_id=algorithm(findings.model),
        )
    ]
    if findings.cbam_probability is not None and findings.cbam_model is not None:
        measurements.append(
            hd.sr.Measurement(
                name=PROBABILITY,
                value=float(findings.cbam_probability),
                unit=UNITY,
                algorithm_id=algorithm(findings.cbam_model),
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier="COVID-19 triage"
        ),
        finding_type=COVID19,
        algorithm_id=pipeline,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=COVID19, value=PRESENT if findings.positive else ABSENT
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in evidence
        ],
    )
    if findings.comment:
        # free-text caveat on the finding (e.g. "out of distribution: ..."), in the group
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=findings.comment,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=findings.model.name[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST,
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        software_versions=_software_versions(findings),
        is_complete=True,
        is_final=False,
        is_verified=False,
        **_new_object(
            findings, series_instance_uid, sop_instance_uid, series_number, institution_name
        ),
        series_description=f"COVID-19 triage report - {NOT_FOR_DIAGNOSTIC_USE}",
    )


def build_capture(
    source_datasets: Sequence[pydicom.Dataset],
    findings: StudyFindings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    institution_name: str | None = None,
) -> hd.sc.SCImage:
    """The Secondary Capture of the key slice with the heat-map and the warning burned in."""
    key = source_datasets[findings.key_slice_index]
    hu = slice_hu(key)
    verdict = "positive" if findings.positive else "negative"
    caption = (
        f"COVID-19 p={findings.fusion_probability:.2f} ({verdict}) "
        f"{findings.model.name} {findings.model.version}"
    )
    pixels = render_key_slice(hu, findings.heatmap, captions=(NOT_FOR_DIAGNOSTIC_USE, caption))
    factor = pixels.shape[0] / hu.shape[0]
    spacing = key.get("PixelSpacing")
    pixel_spacing = (float(spacing[0]) / factor, float(spacing[1]) / factor) if spacing else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=key,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        software_versions=_software_versions(findings),
        **_new_object(
            findings, series_instance_uid, sop_instance_uid, series_number, institution_name
        ),
        pixel_spacing=pixel_spacing,
        patient_orientation=_patient_orientation(key),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        series_description=f"COVID-19 heat-map - {NOT_FOR_DIAGNOSTIC_USE}",
    )
    sc.copy_patient_and_study_information(key)
    # Rendered on a workstation, not digitised; the text is part of the pixels.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    # A chest slice: an unpaired body part, so Laterality (General Series, 2C) stays absent.
    sc.BodyPartExamined = "CHEST"
    sc.ImageComments = NOT_FOR_DIAGNOSTIC_USE
    sc.DerivationDescription = (
        f"Lung window W{LUNG_WINDOW[1]:g}/L{LUNG_WINDOW[0]:g} with model heat-map overlay"
    )
    source = pydicom.Dataset()
    source.ReferencedSOPClassUID = key.SOPClassUID
    source.ReferencedSOPInstanceUID = key.SOPInstanceUID
    source.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_FOR_PROCESSING)]
    sc.SourceImageSequence = [source]
    return sc


def build_segmentation(
    source_datasets: Sequence[pydicom.Dataset],
    findings: StudyFindings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    tracking_uid: str,
    device_serial_number: str = "0",
    institution_name: str | None = None,
) -> hd.seg.Segmentation | None:
    """A BINARY Segmentation of the infected regions, only on slices that have any (or None)."""
    indices = sorted(i for i, m in findings.infected_masks.items() if np.any(m))
    if not indices:
        return None
    masks = np.stack([findings.infected_masks[i].astype(bool) for i in indices])
    algorithm = hd.AlgorithmIdentificationSequence(
        name=findings.model.name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=findings.model.version[:64],
        source=MANUFACTURER,
        parameters=_algorithm_parameters(findings),
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Infection",
        segmented_property_category=LESION_CATEGORY,
        segmented_property_type=LESION_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid,
        tracking_id="COVID-19 infection",
        anatomic_regions=[LUNG],
    )
    seg = hd.seg.Segmentation(
        source_images=[_header(source_datasets[i]) for i in indices],
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        software_versions=f"triaged {__version__}",  # all versions are set below
        device_serial_number=device_serial_number,
        content_label="INFECTION",
        content_description=NOT_FOR_DIAGNOSTIC_USE,
        omit_empty_frames=True,
        **_new_object(
            findings, series_instance_uid, sop_instance_uid, series_number, institution_name
        ),
        series_description=f"COVID-19 infection - {NOT_FOR_DIAGNOSTIC_USE}",
    )
    # highdicom types this as str | tuple[str]; pydicom wants a list for several LO values.
    seg["SoftwareVersions"].value = _software_versions(findings)
    return seg


def build_results(
    source_datasets: Sequence[pydicom.Dataset],
    findings: StudyFindings,
    *,
    result_key: str,
    uid_root: str | None = None,
    series_numbers: dict[str, int] | None = None,
    institution_name: str | None = None,
    device_serial_number: str = "0",
) -> ResultObjects:
    """Build the SR, Secondary Capture and Segmentation of one scored study.

    ``source_datasets`` is the selected axial CT series in sorted order, with pixel data;
    ``result_key`` (e.g. the job id) together with the study fixes every UID, so calling this
    again for the same job yields the same Series and SOP Instance UIDs.
    """
    _check_sources(source_datasets, findings)
    numbers = {**SERIES_NUMBERS, **(series_numbers or {})}
    study_uid = str(source_datasets[0].StudyInstanceUID)

    def uid(role: str) -> str:
        return deterministic_uid(study_uid, result_key, role, uid_root=uid_root)

    sr = build_report(
        source_datasets,
        findings,
        series_instance_uid=uid("sr.series"),
        sop_instance_uid=uid("sr.instance"),
        series_number=numbers["sr"],
        tracking_uid=uid("sr.tracking"),
        device_uid=deterministic_uid(MANUFACTURER, "device observer", uid_root=uid_root),
        institution_name=institution_name,
    )
    sc = build_capture(
        source_datasets,
        findings,
        series_instance_uid=uid("sc.series"),
        sop_instance_uid=uid("sc.instance"),
        series_number=numbers["sc"],
        institution_name=institution_name,
    )
    seg = build_segmentation(
        source_datasets,
        findings,
        series_instance_uid=uid("seg.series"),
        sop_instance_uid=uid("seg.instance"),
        series_number=numbers["seg"],
        tracking_uid=uid("seg.tracking"),
        device_serial_number=device_serial_number,
        institution_name=institution_name,
    )
    return ResultObjects(sr=sr, sc=sc, seg=seg)
