"""Response and request bodies of the JSON API (they make up ``/openapi.json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class DeliverySummary(_Out):
    pending: int = 0
    delivered: int = 0
    dead: int = 0
    last_error: str | None = Field(None, description="the reason of the latest dead delivery")


class StudyItem(_Out):
    """One worklist line."""

    study_instance_uid: str
    patient_id: str | None
    accession_number: str | None
    study_date: str | None = Field(description="YYYY-MM-DD, as the PACS sent it")
    study_description: str | None
    state: str
    state_reason: str | None
    priority: int
    requested_priority: str | None
    flag: bool
    ood_reason: str | None = Field(
        None,
        description="set when the slices are unlike the model's training data: the "
        "score is shown but the study was not flagged on it alone",
    )
    fusion_probability: float | None
    cbam_probability: float | None
    model_version: str | None = Field(description="the models that scored it, name:version")
    received_at: str
    waiting_seconds: float = Field(description="time since the first instance arrived")
    scored_at: str | None
    delivered_at: str | None
    deliveries: DeliverySummary
    feedback: str | None = Field(description="latest radiologist verdict: confirm | refute")


class WorklistOut(_Out):
    generated_at: str
    count: int
    studies: list[StudyItem]


class SeriesOut(_Out):
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instances: int


class ResultOut(_Out):
    pipeline: str
    series_instance_uid: str | None
    fusion_probability: float | None
    cbam_probability: float | None
    threshold: float
    flag: bool
    priority: int
    ood: dict[str, Any] | None = Field(
        None, description="out-of-distribution assessment (null: the model has no OOD fit)"
    )
    models: dict[str, str]
    slice_probabilities: list[float]
    slice_indices: list[int] | None = Field(
        description="series position of each scored slice; null: the scores cover the series"
    )
    key_slice: int | None = Field(description="series position of the key slice")
    key_slice_position: int | None = Field(
        description="index of the key slice in slice_probabilities (null if not among them)"
    )
    timings: dict[str, float]
    sr_text: list[str]
    images: dict[str, str | None] = Field(description="kind -> URL of the PNG, null if absent")
    created_at: str
    raw_probability: float | None = Field(
        default=None, description="the aggregate before calibration"
    )
    operating_point: str | None = Field(
        default=None, description="the fitted operating point that fired (null: none)"
    )
    calibrated_on: int | None = Field(
        default=None,
        description="validation studies the calibration was fitted on "
        "(null: fusion_probability is not calibrated)",
    )


class DeliveryOut(_Out):
    destination: str
    object_kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: str | None
    delivered_at: str | None


class EventOut(_Out):
    state: str
    reason: str | None
    at: str


class FeedbackOut(_Out):
    user: str
    verdict: Literal["confirm", "refute"]
    label: Literal["covid", "non-covid"]
    note: str | None
    at: str


class StudyDetail(_Out):
    study: StudyItem
    series: list[SeriesOut]
    result: ResultOut | None
    deliveries: list[DeliveryOut]
    timeline: list[EventOut]
    feedback: list[FeedbackOut]


class StudyRevision(_Out):
    state: str
    revision: str = Field(description="changes whenever anything on the study page changes")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Literal["confirm", "refute"]
    note: str | None = Field(None, max_length=4000)


class Me(_Out):
    name: str
    role: str
    csrf_token: str = Field(description="send as X-CSRF-Token on every POST")


class LabelOut(_Out):
    study_instance_uid: str
    label: Literal["covid", "non-covid"]
    spool_paths: list[str]
    series_instance_uid: str | None = None
    labelled_by: str | None = None
    labelled_at: str | None = None
    model: str | None = None
    probability: float | None = None


class LabelExportOut(_Out):
    """``triaged-labels/1``, read by ``triaged retrain`` (triaged.training.dicom_data)."""

    format: Literal["triaged-labels/1"] = "triaged-labels/1"
    exported_at: str
    spool_root: str | None
    labels: list[LabelOut]


class ModelVersionOut(_Out):
    name: str
    version: str
    live: bool
    card: dict[str, Any]


class ModelOut(_Out):
    name: str
    live: str | None
    can_rollback: bool
    versions: list[ModelVersionOut]
    history: list[dict[str, Any]]


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    reason: str = Field("", max_length=500)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)


class ModelChangeOut(_Out):
    name: str
    live: str


class DestinationOut(_Out):
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool
    pending: int = Field(0, description="result objects waiting to be sent")
    dead: int = Field(0, description="dead-lettered objects (retry resends them)")


class RetryOut(_Out):
    destination: str
    requeued: int


class EchoOut(_Out):
    destination: str
    ok: bool
    message: str


class CheckOut(_Out):
    ok: bool | None = Field(description="null: not reported by this process")
    detail: str


class HealthOut(_Out):
    ok: bool
    checks: dict[str, CheckOut]


class AuditOut(_Out):
    at: str
    user: str | None
    action: str
    target: str | None
    client: str | None
    detail: str | None
