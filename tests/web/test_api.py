"""The JSON API and the pages, endpoint by endpoint (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
import torch
from fastapi.testclient import TestClient
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session

from tests.web.conftest import Web, _add_result, study_uid
from triaged.registry import Architecture, ModelCard, ModelStore, TrainingData
from triaged.training.dicom_data import read_label_export, worklist_labels
from triaged.web.app import create_app
from triaged.web.queries import export_labels
from triaged.worklist import db
from triaged.worklist.models import Delivery, Job, Result, Study, utcnow
from triaged.worklist.web_models import AuditEntry

Seed = Callable[..., str]


def audit_rows(web: Web) -> list[tuple[str | None, str, str | None, str | None]]:
    with Session(web.engine) as s:
        return [
            (a.user_name, a.action, a.target, a.client)
            for a in s.scalars(sa.select(AuditEntry).order_by(AuditEntry.id))
        ]


SVG = "{http://www.w3.org/2000/svg}"


def scenario(seed: Seed) -> dict[str, str]:
    """A small worklist: two flagged (different priority), one negative, one waiting, one
    skipped, one with a dead delivery."""
    return {
        "old_neg": seed(
            1,
            received_ago=5000,
            study_date="20250101",
            scored={"fusion": 0.12, "cbam": 0.2, "flag": False, "priority": 0},
            deliveries=[("pacs", "SR", "DELIVERED", None)],
        ),
        "pos_low": seed(
            2,
            received_ago=4000,
            study_date="20250201",
            scored={"fusion": 0.81, "cbam": 0.7, "flag": True, "priority": 50},
        ),
        "pos_high": seed(
            3,
            received_ago=100,
            study_date="20250301",
            scored={"fusion": 0.97, "cbam": 0.9, "flag": True, "priority": 90},
        ),
        "queued": seed(4, received_ago=7000, study_date="20250401", state="QUEUED"),
        "skipped": seed(
            5,
            received_ago=3000,
            study_date="20250402",
            state="SKIPPED",
            reason="no axial CT series",
        ),
        "dead": seed(
            6,
            received_ago=2000,
            study_date="20250403",
            scored={"fusion": 0.3, "cbam": 0.25, "flag": False, "priority": 0},
            deliveries=[
                ("pacs", "SR", "DELIVERED", None),
                ("pacs", "SEG", "DEAD", "C-STORE refused: 0xA700 out of resources"),
            ],
        ),
    }


def uids(resp: Any) -> list[str]:
    return [s["study_instance_uid"] for s in resp.json()["studies"]]


def test_worklist_order_and_fields(web: Web, seed: Seed) -> None:
    ids = scenario(seed)
    c = web.client("radiologist")
    r = c.get("/api/studies")
    assert r.status_code == 200
    # priority first, then the longest waiting
    assert uids(r) == [
        ids[k] for k in ("pos_high", "pos_low", "queued", "old_neg", "skipped", "dead")
    ]
    rows = {s["study_instance_uid"]: s for s in r.json()["studies"]}
    high = rows[ids["pos_high"]]
    assert high["flag"] is True and high["fusion_probability"] == pytest.approx(0.97)
    assert high["cbam_probability"] == pytest.approx(0.9)
    assert high["model_version"] == "cbam:v1, fusion:v1"
    assert high["study_date"] == "2025-03-01" and high["patient_id"] == "PAT003"
    assert 90 < high["waiting_seconds"] < 400
    assert rows[ids["skipped"]]["state"] == "SKIPPED"
    assert rows[ids["skipped"]]["state_reason"] == "no axial CT series"
    dead = rows[ids["dead"]]["deliveries"]
    assert dead == {
        "pending": 0,
        "delivered": 1,
        "dead": 1,
        "last_error": "C-STORE refused: 0xA700 out of resources",
    }
    assert rows[ids["old_neg"]]["state"] == "DELIVERED"
    assert rows[ids["queued"]]["fusion_probability"] is None


def test_worklist_filters(web: Web, seed: Seed) -> None:
    ids = scenario(seed)
    c = web.client("radiologist")
    assert uids(c.get("/api/studies?state=SKIPPED")) == [ids["skipped"]]
    assert uids(c.get("/api/studies?state=DELIVERY_FAILED")) == [ids["dead"]]
    assert uids(c.get("/api/studies?flagged=true")) == [ids["pos_high"], ids["pos_low"]]
    assert ids["pos_high"] not in uids(c.get("/api/studies?flagged=false"))
    assert uids(c.get("/api/studies?min_priority=60")) == [ids["pos_high"]]
    got = uids(c.get("/api/studies?date_from=2025-02-01&date_to=2025-04-01"))
    assert got == [ids["pos_high"], ids["pos_low"], ids["queued"]]
    assert uids(c.get("/api/studies?limit=2")) == [ids["pos_high"], ids["pos_low"]]
    assert c.get("/api/studies?state=BOGUS").status_code == 422
    assert c.get("/api/studies?date_from=yesterday").status_code == 422


def test_worklist_page(web: Web, seed: Seed) -> None:
    ids = scenario(seed)
    c = web.client("radiologist")
    r = c.get("/?state=SCORED&flagged=true")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    html = r.text
    assert html.index(ids["pos_high"]) < html.index(ids["pos_low"])
    assert ids["old_neg"] not in html
    assert '<option value="SCORED" selected>' in html and '<option value="true" selected>' in html
    assert "97%" in html and "COVID-19" in html
    page = c.get("/").text
    assert "1 delivery failed: C-STORE refused" in page and "no axial CT series" in page
    assert 'tabindex="0"' in page and "/static/worklist.js" in page


def test_study_detail_api_and_audit(web: Web, seed: Seed) -> None:
    ids = scenario(seed)
    uid = ids["dead"]
    c = web.client("radiologist")
    d = c.get(f"/api/studies/{uid}").json()
    assert d["study"]["study_instance_uid"] == uid
    res = d["result"]
    assert res["images"] == {
        "heatmap": f"/api/studies/{uid}/images/heatmap",
        "infected": f"/api/studies/{uid}/images/infected",
    }
    assert res["slice_probabilities"][3] == pytest.approx(0.9) and res["key_slice"] == 3
    assert res["sr_text"][0].startswith("Finding: COVID-19")
    assert [x["state"] for x in d["deliveries"]] == ["DEAD", "DELIVERED"]
    assert d["deliveries"][0]["last_error"].startswith("C-STORE refused")
    assert [e["state"] for e in d["timeline"]] == [
        "RECEIVING",
        "COMPLETE",
        "QUEUED",
        "SCORING",
        "SCORED",
    ]
    assert d["series"][0]["instances"] == 3
    assert c.get("/api/studies/9.9.9").status_code == 404
    assert audit_rows(web)[-1] == ("rad", "view_study", uid, "testclient")


def test_study_revision_follows_what_the_page_shows(web: Web, seed: Seed) -> None:
    uid = seed(1, state="SCORING")
    c = web.client("radiologist")
    audited = len(audit_rows(web))

    def rev() -> dict[str, str]:
        r = c.get(f"/api/studies/{uid}/revision")
        assert r.status_code == 200
        return dict(r.json())

    first = rev()
    assert first["state"] == "SCORING" and rev() == first  # stable while nothing changes
    assert len(audit_rows(web)) == audited  # polling reads no patient data: not audited
    with Session(web.engine) as s, s.begin():
        st = s.scalars(sa.select(Study).where(Study.study_instance_uid == uid)).one()
        series_uid = f"{uid}.1"
        _add_result(
            web,
            s,
            st,
            series_uid,
            {"fusion": 0.9, "flag": True, "priority": 9},
            [("pacs", "SR", "PENDING", None)],
            utcnow(),
        )
    scored = rev()
    assert scored["state"] == "SCORED" and scored["revision"] != first["revision"]
    with Session(web.engine) as s, s.begin():  # a retry changes only the delivery row
        d = s.scalars(sa.select(Delivery)).one()
        d.attempts += 1
        d.last_error = "connection failed"
    retried = rev()
    assert retried["revision"] != scored["revision"]
    assert c.post(f"/api/studies/{uid}/feedback", json={"verdict": "confirm"}).status_code == 201
    assert rev()["revision"] != retried["revision"]  # another reader's verdict shows up
    assert c.get("/api/studies/9.9.9/revision").status_code == 404
    assert web.client().get(f"/api/studies/{uid}/revision").status_code == 401
    html = c.get(f"/studies/{uid}").text
    assert f'data-revision="{rev()["revision"]}"' in html and "/static/study.js" in html


def test_study_page(web: Web, seed: Seed) -> None:
    ids = scenario(seed)
    c = web.client("radiologist")
    uid = ids["pos_high"]
    html = c.get(f"/studies/{uid}").text
    assert f'src="/api/studies/{uid}/images/heatmap"' in html
    assert f'src="/api/studies/{uid}/images/infected"' in html
    assert '<svg class="slice-plot"' in html and "key slice 4" in html
    assert "Finding: COVID-19 (SNOMED CT 840539006)" in html
    assert "COVID-19 likely" in html and "Confirm COVID-19" in html
    assert audit_rows(web)[-1] == ("rad", "view_study", uid, "testclient")
    # a queued study has no result yet: no images, no feedback form
    queued = c.get(f"/studies/{ids['queued']}").text
    assert "Not scored yet" in queued and 'name="verdict"' not in queued
    skipped = c.get(f"/studies/{ids['skipped']}").text
    assert "SKIPPED: no axial CT series" in skipped
    r = c.get("/studies/9.9.9")
    assert r.status_code == 404 and "No such study" in r.text


def test_study_page_shows_the_calibration_and_the_operating_point(web: Web, seed: Seed) -> None:
    uid = seed(
        8,
        scored={
            "fusion": 0.62,
            "flag": True,
            "priority": 100,
            "decision": {
                "raw_probability": 0.991,
                "operating_point": "urgent",
                "calibrated_on": 40,
            },
        },
    )
    c = web.client("radiologist")
    html = c.get(f"/studies/{uid}").text
    assert "calibrated on 40 validation studies" in html and "<strong>urgent</strong>" in html
    res = c.get(f"/api/studies/{uid}").json()["result"]
    assert (res["operating_point"], res["calibrated_on"]) == ("urgent", 40)
    assert res["raw_probability"] == pytest.approx(0.991)
    plain = seed(9, scored={"fusion": 0.62})  # an uncalibrated (older) result: no line
    assert 'id="decision"' not in c.get(f"/studies/{plain}").text


def _plot(html: str) -> ET.Element:
    start = html.index('<svg class="slice-plot"')
    return ET.fromstring(html[start : html.index("</svg>", start) + len("</svg>")])


def test_study_plot_uses_scored_positions_and_the_pipeline_threshold(web: Web, seed: Seed) -> None:
    """Six slices scored out of a 40-slice series: the key slice is series position 23,
    the fourth scored slice; the pipeline's threshold is 0.3, not the default 0.5."""
    probs = [0.1, 0.2, 0.7, 0.9, 0.4, 0.1]
    uid = seed(
        7,
        scored={
            "fusion": 0.9,
            "flag": True,
            "priority": 90,
            "slices": probs,
            "slice_indices": [5, 11, 17, 23, 29, 35],
            "key": 23,
            "threshold": 0.3,
        },
    )
    c = web.client("radiologist")
    svg = _plot(c.get(f"/studies/{uid}").text)
    line = svg.find(f"{SVG}polyline")
    assert line is not None
    pts = [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]
    lines = list(svg.iter(f"{SVG}line"))
    key = next(e for e in lines if e.attrib.get("class") == "key")
    assert float(key.attrib["x1"]) == pytest.approx(pts[3][0], abs=0.1)
    grid = sorted(float(e.attrib["y1"]) for e in lines if e.attrib.get("class") == "grid")
    thr = next(e for e in lines if e.attrib.get("class") == "threshold")
    assert float(thr.attrib["y1"]) == pytest.approx(grid[-1] - 0.3 * (grid[-1] - grid[0]), abs=0.1)
    title = svg.find(f"{SVG}title")
    assert title is not None and title.text is not None
    assert "3 at or above 0.30" in title.text and title.text.endswith("key slice 24")
    res = c.get(f"/api/studies/{uid}").json()["result"]
    assert res["threshold"] == pytest.approx(0.3)
    assert (res["key_slice"], res["key_slice_position"]) == (23, 3)


def test_study_page_plots_what_the_worker_wrote(web: Web, seed: Seed, tmp_path: Path) -> None:
    """Scored by the real path the worker takes (8 of 24 slices selected, threshold 0.3):
    the page marks the key slice among the scored slices and draws the pipeline's threshold."""
    from tests.pipeline.conftest import make_pipeline, register_cbam, register_fusion
    from triaged.pipeline.models import load_models
    from triaged.pipeline.scoring import StudyScore, score_study
    from triaged.processing import write_results
    from triaged.synthetic import generate_study

    torch.set_num_threads(1)
    store = ModelStore(tmp_path / "models")
    register_fusion(store, seed=0)
    register_cbam(store)
    pipeline = make_pipeline(priority={"sr_threshold": 0.3})
    study = generate_study(tmp_path / "s", seed=5, positive=True, slices=24, size=64)
    score = score_study(study.series_of_kind("axial").paths, pipeline, load_models(pipeline, store))
    assert isinstance(score, StudyScore)
    position = list(score.slice_indices).index(score.key_slice_index)
    assert len(score.slice_indices) == 8 and position != score.key_slice_index
    _, details, _ = write_results(score, tmp_path / "out", "t")
    uid = seed(9, scored={"fusion": score.fusion_probability, "priority": score.priority})
    with Session(web.engine) as s, s.begin():
        s.execute(
            sa.update(Result).values(
                details=details.to_json(),
                key_slice=score.key_slice_index,
                slice_probabilities=list(score.fusion_slice_probabilities),
            )
        )
    svg = _plot(web.client("radiologist").get(f"/studies/{uid}").text)
    line = svg.find(f"{SVG}polyline")
    assert line is not None
    xs = [float(p.split(",")[0]) for p in line.attrib["points"].split()]
    lines = list(svg.iter(f"{SVG}line"))
    key = next(e for e in lines if e.attrib.get("class") == "key")
    assert float(key.attrib["x1"]) == pytest.approx(xs[position], abs=0.1)
    grid = sorted(float(e.attrib["y1"]) for e in lines if e.attrib.get("class") == "grid")
    thr = next(e for e in lines if e.attrib.get("class") == "threshold")
    assert float(thr.attrib["y1"]) == pytest.approx(grid[-1] - 0.3 * (grid[-1] - grid[0]), abs=0.1)


def test_result_details_of_the_previous_version_and_damaged_ones_load(web: Web, seed: Seed) -> None:
    uid = seed(
        8,
        scored={"fusion": 0.8, "flag": True, "priority": 50, "key": 12, "slices": [0.2, 0.8, 0.3]},
    )
    folder = web.results / uid
    old = {  # exactly what processing.write_results stored before the typed schema
        "images": {
            "heatmap": str(folder / "heatmap.png"),
            "infected": str(folder / "infected.png"),
        },
        "sr_text": ["Finding: COVID-19 (SNOMED CT 840539006)"],
        "summary": {
            "pipeline": "covid-ct:1",
            "threshold": 0.42,
            "positive": True,
            "model": {"name": "fusion", "version": "v1"},
            "cbam_model": None,
            "key_slice": {"index": 12, "sop_instance_uid": "1.2.3"},
            "top_slices": [{"index": 12, "sop_instance_uid": "1.2.3"}],
            "infected_pixels": {"12": 40},
            "outputs": ["sr"],
            "timings": {"a": 1.0},
        },
        "slice_indices": [4, 12, 20],
        "cbam_slice_probabilities": None,
        "objects": {"SR": {"sop_instance_uid": "1.2.4", "path": "/x/SR.dcm"}},
    }
    c = web.client("radiologist")

    def store(details: object) -> dict[str, Any]:
        with Session(web.engine) as s, s.begin():
            s.execute(sa.update(Result).values(details=details))
        r = c.get(f"/api/studies/{uid}")
        assert r.status_code == 200
        assert c.get(f"/studies/{uid}").status_code == 200
        result: dict[str, Any] = r.json()["result"]
        return result

    res = store(old)
    assert res["threshold"] == pytest.approx(0.42) and res["key_slice_position"] == 1
    assert res["images"]["heatmap"] and res["sr_text"] == old["sr_text"]
    damaged = store({"images": 5, "sr_text": ["kept"], "summary": {"threshold": "high"}})
    assert damaged["threshold"] == 0.5 and damaged["sr_text"] == ["kept"]
    assert damaged["images"] == {"heatmap": None, "infected": None}
    assert store(["not", "an", "object"])["sr_text"] == []


def test_study_images(web: Web, seed: Seed) -> None:
    ids = scenario(seed)
    c = web.client("radiologist")
    r = c.get(f"/api/studies/{ids['pos_high']}/images/heatmap")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(f"/api/studies/{ids['pos_high']}/images/other").status_code == 404
    assert c.get(f"/api/studies/{ids['queued']}/images/heatmap").status_code == 404
    (web.results / ids["pos_low"] / "infected.png").unlink()
    assert c.get(f"/api/studies/{ids['pos_low']}/images/infected").status_code == 404
    d = c.get(f"/api/studies/{ids['pos_low']}").json()
    assert d["result"]["images"]["infected"] is None and d["result"]["images"]["heatmap"]


def test_feedback_api(web: Web, seed: Seed) -> None:
    ids = scenario(seed)
    c = web.client("radiologist")
    pos, neg = ids["pos_high"], ids["old_neg"]
    r = c.post(f"/api/studies/{pos}/feedback", json={"verdict": "confirm", "note": " GGO both "})
    assert r.status_code == 201
    body = r.json()
    assert body["user"] == "rad" and body["label"] == "covid" and body["note"] == "GGO both"
    # refuting a negative finding means it is COVID-19; confirming it means it is not
    assert (
        c.post(f"/api/studies/{neg}/feedback", json={"verdict": "refute"}).json()["label"]
        == "covid"
    )
    assert (
        c.post(f"/api/studies/{neg}/feedback", json={"verdict": "confirm"}).json()["label"]
        == "non-covid"
    )
    assert c.post(f"/api/studies/{pos}/feedback", json={"verdict": "maybe"}).status_code == 422
    assert (
        c.post(f"/api/studies/{ids['queued']}/feedback", json={"verdict": "confirm"}).status_code
        == 409
    )
    assert c.post("/api/studies/9.9.9/feedback", json={"verdict": "confirm"}).status_code == 404
    listed = c.get(f"/api/studies/{neg}/feedback").json()
    assert [f["verdict"] for f in listed] == ["refute", "confirm"]
    row = [s for s in c.get("/api/studies").json()["studies"] if s["study_instance_uid"] == neg]
    assert row[0]["feedback"] == "confirm"
    assert ("rad", "feedback", pos, "testclient") in audit_rows(web)


def test_feedback_form_shows_on_page(web: Web, seed: Seed) -> None:
    uid = seed(1, scored={"fusion": 0.9, "flag": True, "priority": 9})
    c = web.client("radiologist")
    token = c.headers["X-CSRF-Token"]
    r = c.post(
        f"/studies/{uid}/feedback",
        data={"verdict": "refute", "note": "<b>old scar</b>", "csrf_token": token},
    )
    assert r.status_code == 303 and r.headers["location"] == f"/studies/{uid}#feedback"
    html = c.get(f"/studies/{uid}").text
    assert "✗ refuted" in html and "&lt;b&gt;old scar&lt;/b&gt;" in html  # escaped
    r = c.post(f"/studies/{seed(2)}/feedback", data={"verdict": "confirm", "csrf_token": token})
    assert r.status_code == 409 and "no result" in r.text


def _ct_files(folder: Path, series_uid: str, n: int) -> None:
    """Tiny CT slices scoring (and so retraining) accepts: placed, with pixel spacing, and
    a ring of soft tissue (0 HU) around lung (-800 HU) in air (-1024 HU)."""
    stored = np.zeros((8, 8), dtype=np.int16)  # air
    stored[1:7, 1:7] = 1024  # soft tissue
    stored[2:6, 2:6] = 224  # lung
    for i in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = 8
        ds.PixelSpacing = [1, 1]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"{series_uid}.{i + 1}.dcm", enforce_file_format=True)


def test_labels_export_is_read_by_retrain(web: Web, seed: Seed, tmp_path: Path) -> None:
    ids = scenario(seed)
    rad, admin = web.client("radiologist"), web.client("admin")
    rad.post(f"/api/studies/{ids['pos_high']}/feedback", json={"verdict": "confirm"})
    rad.post(f"/api/studies/{ids['old_neg']}/feedback", json={"verdict": "confirm"})
    rad.post(f"/api/studies/{ids['pos_low']}/feedback", json={"verdict": "refute"})
    for key in ("pos_high", "old_neg", "pos_low"):  # real slices in place of the dummy files
        folder = web.spool / ids[key] / f"{ids[key]}.1"
        for f in folder.iterdir():
            f.unlink()
        _ct_files(folder, f"{ids[key]}.1", 5)
    assert rad.get("/api/labels").status_code == 403
    export = admin.get("/api/labels").json()
    assert export["format"] == "triaged-labels/1"
    assert export["spool_root"] == str(web.spool.resolve())
    by_uid = {x["study_instance_uid"]: x for x in export["labels"]}
    assert {u: x["label"] for u, x in by_uid.items()} == {
        ids["pos_high"]: "covid",
        ids["old_neg"]: "non-covid",
        ids["pos_low"]: "non-covid",
    }
    high = by_uid[ids["pos_high"]]
    assert high["spool_paths"] == [f"{ids['pos_high']}/{ids['pos_high']}.1"]
    assert high["labelled_by"] == "rad" and high["probability"] == pytest.approx(0.97)
    assert high["series_instance_uid"] == f"{ids['pos_high']}.1"
    # what the API serves, the trainer reads
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(export))
    parsed = read_label_export(path)
    assert {r.study_instance_uid: r.label for r in parsed.labels}[ids["pos_high"]] == 1
    samples = worklist_labels(path, slices_per_study=2)
    got = {s.group: s.label for split in samples.values() for s in split}
    assert got == {ids["pos_high"]: 1, ids["old_neg"]: 0, ids["pos_low"]: 0}
    # and the file export (absolute paths when no spool root is given)
    out = tmp_path / "out" / "labels.json"
    assert export_labels(web.engine, out) == 3
    written = read_label_export(out)
    assert written.spool_root is None and Path(written.labels[0].spool_paths[0]).is_absolute()
    assert sum(len(v) for v in worklist_labels(out, slices_per_study=2).values()) == 6
    assert ("ann", "export_labels", None, "testclient") in audit_rows(web)


def _store(root: Path) -> ModelStore:
    store = ModelStore(root)
    for acc in (0.81, 0.86):
        card = ModelCard(
            architecture=Architecture(name="fusion", params={}),
            data=TrainingData(
                sources=["synthetic:8"], split="seeded 80/20", counts={"train": 8, "val": 2}
            ),
            metrics={"accuracy": acc, "f1": acc - 0.01},
            seed=1,
        )
        store.register("fusion", {"w": torch.zeros(2)}, card)
    store.promote("fusion", "v1")
    return store


def test_admin_models_promote_rollback(web: Web, tmp_path: Path) -> None:
    web.store = _store(tmp_path / "models")
    c = web.client("admin")
    models = c.get("/api/admin/models").json()
    assert [(m["name"], m["live"], m["can_rollback"]) for m in models] == [("fusion", "v1", False)]
    assert [v["version"] for v in models[0]["versions"]] == ["v2", "v1"]
    assert models[0]["versions"][0]["card"]["metrics"]["accuracy"] == pytest.approx(0.86)
    r = c.post("/api/admin/models/fusion/promote", json={"version": "v2", "reason": "better"})
    assert r.status_code == 200 and r.json() == {"name": "fusion", "live": "v2"}
    assert web.store.live("fusion").version == "v2"
    assert web.store.history("fusion")[-1]["reason"] == "web ann: better"
    assert c.get("/api/admin/models").json()[0]["can_rollback"] is True
    r = c.post("/api/admin/models/fusion/rollback", json={})
    assert r.json()["live"] == "v1" and web.store.live("fusion").version == "v1"
    assert c.post("/api/admin/models/fusion/rollback", json={}).status_code == 409
    assert c.post("/api/admin/models/fusion/promote", json={"version": "v9"}).status_code == 404
    assert c.post("/api/admin/models/other/promote", json={"version": "v1"}).status_code == 404
    # the page and its forms
    page = c.get("/admin").text
    assert "fusion" in page and "accuracy 0.860" in page and "Promote" in page
    r = c.post(
        "/admin/models/fusion/promote",
        data={"version": "v2", "csrf_token": c.headers["X-CSRF-Token"]},
    )
    assert r.status_code == 303 and web.store.live("fusion").version == "v2"
    acts = [a for a in audit_rows(web) if a[1] in ("promote_model", "rollback_model")]
    assert [(a[1], a[2]) for a in acts] == [
        ("promote_model", "fusion:v2"),
        ("rollback_model", "fusion:v1"),
        ("promote_model", "fusion:v2"),
    ]
    assert ("ann", "view_admin", None, "testclient") in audit_rows(web)


def test_admin_without_store(web: Web) -> None:
    c = web.client("admin")
    assert c.get("/api/admin/models").status_code == 503
    page = c.get("/admin")
    assert page.status_code == 200 and "No model store" in page.text


def test_destinations_and_echo(web: Web) -> None:
    c = web.client("admin")
    dests = c.get("/api/admin/destinations").json()
    assert [(d["name"], d["ae_title"], d["port"]) for d in dests] == [
        ("pacs", "PACS", 11113),
        ("down", "DOWN", 11114),
    ]
    assert c.post("/api/admin/destinations/pacs/echo").json() == {
        "destination": "pacs",
        "ok": True,
        "message": "C-ECHO success",
    }
    assert c.post("/api/admin/destinations/down/echo").json()["ok"] is False
    assert c.post("/api/admin/destinations/nope/echo").status_code == 404
    assert web.echoes == ["pacs", "down"]
    page = c.post("/admin/destinations/pacs/echo", data={"csrf_token": c.headers["X-CSRF-Token"]})
    assert page.status_code == 200 and "C-ECHO pacs: C-ECHO success" in page.text
    echo_audit = [a for a in audit_rows(web) if a[1] == "echo"]
    assert [a[2] for a in echo_audit] == ["pacs", "down", "pacs"]
    no_echo = web.client("admin", echo=None)
    assert no_echo.post("/api/admin/destinations/pacs/echo").status_code == 503


def test_dead_deliveries_are_counted_and_retried(web: Web, seed: Seed) -> None:
    ids = scenario(seed)  # "dead": SR delivered, SEG dead-lettered at "pacs"
    with Session(web.engine) as s, s.begin():
        st = s.scalars(sa.select(Study).where(Study.study_instance_uid == ids["dead"])).one()
        st.state = "FAILED"
        st.state_reason = "delivery of SEG to pacs failed: C-STORE refused"
    c = web.client("admin")
    dests = {d["name"]: d for d in c.get("/api/admin/destinations").json()}
    assert (dests["pacs"]["pending"], dests["pacs"]["dead"]) == (0, 1)
    assert (dests["down"]["pending"], dests["down"]["dead"]) == (0, 0)
    assert "Retry 1 dead" in c.get("/admin").text
    assert web.client("radiologist").post("/api/admin/destinations/pacs/retry").status_code == 403
    assert c.post("/api/admin/destinations/down/retry").json() == {
        "destination": "down",
        "requeued": 0,
    }
    assert c.post("/api/admin/destinations/nope/retry").status_code == 404
    assert c.post("/api/admin/destinations/pacs/retry").json() == {
        "destination": "pacs",
        "requeued": 1,
    }
    with Session(web.engine) as s:
        st = s.scalars(sa.select(Study).where(Study.study_instance_uid == ids["dead"])).one()
        assert (st.state, st.state_reason) == ("SCORED", "deliveries requeued")
        rows = s.execute(
            sa.select(Delivery.object_kind, Delivery.state, Delivery.attempts)
            .where(Delivery.study_id == st.id)
            .order_by(Delivery.object_kind)
        ).all()
    assert [tuple(r) for r in rows] == [("SEG", "PENDING", 0), ("SR", "DELIVERED", 1)]
    dests = {d["name"]: d for d in c.get("/api/admin/destinations").json()}
    assert (dests["pacs"]["pending"], dests["pacs"]["dead"]) == (1, 0)
    page = c.post("/admin/destinations/pacs/retry", data={"csrf_token": c.headers["X-CSRF-Token"]})
    assert page.status_code == 200 and "pacs: 0 dead-lettered object(s) requeued" in page.text
    assert [a[2:] for a in audit_rows(web) if a[1] == "retry_deliveries"] == [
        ("down", "testclient"),
        ("pacs", "testclient"),
        ("pacs", "testclient"),
    ]


def test_healthz(web: Web) -> None:
    c = web.client()
    r = c.get("/healthz")
    assert r.status_code == 200
    checks = r.json()["checks"]
    assert {k: v["ok"] for k, v in checks.items()} == {
        "database": True,
        "spool": True,
        "scp": True,
        "scheduler": True,
        "model": True,
    }
    assert checks["model"]["detail"] == "fusion:v1"
    for key, bad in [
        ("scp_listening", False),
        ("scheduler_running", False),
        ("live_model", None),
        ("spool_free_mb", 10),
    ]:
        before = web.status[key]
        web.status[key] = bad
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["ok"] is False, key
        web.status[key] = before
    assert c.get("/healthz").status_code == 200

    def broken() -> dict[str, object]:
        raise RuntimeError("boom")

    assert web.client(status=broken).get("/healthz").status_code == 503
    alone = web.client(status=None).get("/healthz").json()
    assert alone["ok"] is True and alone["checks"]["scp"]["ok"] is None
    assert web.client("admin").get("/api/admin/health").json()["ok"] is True


def test_healthz_database_down(web: Web, tmp_path: Path) -> None:
    dead = db.make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    c = TestClient(create_app(web.settings, dead))
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["checks"]["database"]["ok"] is False


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics(web: Web, seed: Seed) -> None:
    scenario(seed)
    with Session(web.engine) as s, s.begin():
        s.add(
            Job(
                study_id=s.scalar(
                    sa.select(Study.id).where(Study.study_instance_uid == study_uid(4))
                ),
                kind="score",
                state="QUEUED",
                attempts=0,
                created_at=s.scalar(sa.select(sa.func.min(Study.updated_at))),
            )
        )
    r = web.client().get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    t = r.text
    assert _sample(t, "triaged_instances_received_total") == 18
    assert _sample(t, 'triaged_studies{state="SCORED"}') == 3
    assert _sample(t, 'triaged_studies{state="DELIVERED"}') == 1
    assert _sample(t, 'triaged_studies{state="SKIPPED"}') == 1
    assert _sample(t, "triaged_studies_flagged") == 2
    assert _sample(t, 'triaged_queue_depth{kind="score"}') == 1
    assert _sample(t, 'triaged_deliveries{state="DEAD"}') == 1
    assert _sample(t, "triaged_delivery_failures_total") == 1
    # four scored studies, each 4 s of scoring
    assert _sample(t, "triaged_scoring_seconds_count") == 4
    assert _sample(t, "triaged_scoring_seconds_sum") == pytest.approx(16, abs=0.01)
    assert _sample(t, 'triaged_scoring_seconds_bucket{le="2.5"}') == 0
    assert _sample(t, 'triaged_scoring_seconds_bucket{le="5.0"}') == 4
    # one delivered study: last instance (+5 s) -> complete (+35 s) -> scored (+4) -> +2
    assert _sample(t, "triaged_end_to_end_seconds_count") == 1
    assert _sample(t, "triaged_end_to_end_seconds_sum") == pytest.approx(36, abs=0.01)
    assert _sample(t, 'triaged_end_to_end_seconds_bucket{le="30.0"}') == 0
    assert _sample(t, 'triaged_end_to_end_seconds_bucket{le="60.0"}') == 1
    assert _sample(t, "triaged_scp_listening") == 1
    assert _sample(t, 'triaged_live_model{model="fusion:v1"}') == 1
    assert _sample(t, "triaged_spool_free_bytes") == 5000 * 1024 * 1024
    # a second process on the same database reports the same numbers
    other = web.client(status=None).get("/metrics").text
    assert _sample(other, 'triaged_studies{state="SCORED"}') == 3
    assert "triaged_scp_listening" not in other


def test_openapi_schema(web: Web) -> None:
    spec = web.client().get("/openapi.json").json()
    paths = spec["paths"]
    for p in (
        "/api/studies",
        "/api/studies/{uid}",
        "/api/studies/{uid}/feedback",
        "/api/studies/{uid}/images/{kind}",
        "/api/labels",
        "/api/admin/models",
        "/api/admin/models/{name}/promote",
        "/api/admin/models/{name}/rollback",
        "/api/admin/destinations",
        "/api/admin/destinations/{name}/echo",
        "/api/admin/health",
        "/api/admin/audit",
        "/api/me",
        "/healthz",
        "/metrics",
    ):
        assert p in paths, p
    ok = paths["/api/studies"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["$ref"].endswith("/WorklistOut")
    assert "StudyItem" in spec["components"]["schemas"]
    assert "/" not in paths and "/login" not in paths  # pages are not API
    assert web.client().get("/docs").status_code == 404  # Swagger UI would need a CDN


def test_security_headers(web: Web) -> None:
    r = web.client().get("/login")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_superseded_result_is_not_shown(web: Web, seed: Seed) -> None:
    uid = seed(1, scored={"fusion": 0.2, "flag": False})
    with Session(web.engine) as s, s.begin():
        old = s.scalars(sa.select(Result)).one()
        old.superseded = True
        s.execute(sa.update(Delivery).values(state="SUPERSEDED"))
    d = web.client("radiologist").get(f"/api/studies/{uid}").json()
    assert d["result"] is None and d["deliveries"] == []


def test_out_of_distribution_reason_on_worklist_study_page_and_cli_list(
    web: Web, seed: Seed
) -> None:
    """A study scored as out of distribution shows the marker and the reason everywhere a
    radiologist looks; an ordinary one, and a row written before the field existed, do not."""
    from triaged.worklist.result_details import OodSummary, ResultDetails, ScoreSummary
    from triaged.worklist.studies import list_studies

    reason = "out of distribution: 7 of 8 slices unlike the training data"
    odd = seed(11, state="SCORED", scored={"fusion": 0.93, "priority": 50, "flag": False})
    plain = seed(12, state="SCORED", scored={"fusion": 0.2, "priority": 0})
    details = ResultDetails(
        summary=ScoreSummary(
            ood=OodSummary(
                distance_share=0.875,
                slices_beyond=7,
                slices=8,
                threshold=6.1,
                max_share=0.5,
                reason=reason,
            )
        )
    )
    with Session(web.engine) as s, s.begin():
        sid = s.scalars(sa.select(Study.id).where(Study.study_instance_uid == odd)).one()
        s.execute(sa.update(Result).where(Result.study_id == sid).values(details=details.to_json()))
    c = web.client("radiologist")
    items = {i["study_instance_uid"]: i for i in c.get("/api/studies").json()["studies"]}
    assert items[odd]["ood_reason"] == reason and items[odd]["flag"] is False
    assert items[plain]["ood_reason"] is None
    detail = c.get(f"/api/studies/{odd}").json()
    assert detail["study"]["ood_reason"] == reason
    assert detail["result"]["ood"]["reason"] == reason
    assert detail["result"]["ood"]["slices_beyond"] == 7
    assert c.get(f"/api/studies/{plain}").json()["result"]["ood"] is None
    page = c.get("/").text
    row = page[page.index(f'data-uid="{odd}"') :]
    row = row[: row.index("</tr>")]
    assert '<span class="ood"' in row and reason in row
    other = page[page.index(f'data-uid="{plain}"') :]
    assert "out of distribution" not in other[: other.index("</tr>")]
    study_page = c.get(f"/studies/{odd}").text
    assert 'id="ood"' in study_page and reason in study_page
    assert 'id="ood"' not in c.get(f"/studies/{plain}").text
    with Session(web.engine) as s:
        rows = {r.study_instance_uid: r for r in list_studies(s)}
    assert rows[odd].ood_reason == reason and rows[plain].ood_reason is None
