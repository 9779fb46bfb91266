"""Fixtures of the web tests: an app over a fresh database, users, seeded studies.

Studies, results, deliveries and images are created through the ORM exactly as the
scoring worker will (``Result.details`` is a ``ResultDetails``: paths of PNGs written
next to the result objects, SR text lines, the summary with the threshold), so the web
code is tested against that contract without running a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session

from triaged.config import Settings, from_dict
from triaged.web.app import create_app
from triaged.web.auth import Principal, hash_password
from triaged.web.deps import SESSION_COOKIE, WebContext
from triaged.worklist.models import (
    Delivery,
    Instance,
    Job,
    Result,
    Series,
    Study,
    StudyEvent,
    utcnow,
)
from triaged.worklist.result_details import ResultDetails, ScoreSummary
from triaged.worklist.web_models import User

RAD_PASSWORD = "reading-room-1"
ADMIN_PASSWORD = "admin-secret-1"


@pytest.fixture(scope="session")
def rad_hash() -> str:
    return hash_password(RAD_PASSWORD)


@pytest.fixture(scope="session")
def admin_hash() -> str:
    return hash_password(ADMIN_PASSWORD)


def add_admin(engine: sa.Engine, password_hash: str) -> None:
    """The database admin ``ann`` (hashed once per session: argon2 is slow on purpose)."""
    with Session(engine) as s, s.begin():
        s.add(
            User(
                name="ann",
                role="admin",
                password_hash=password_hash,
                disabled=False,
                created_at=utcnow(),
            )
        )


@dataclass
class Web:
    """An app over a fresh database, with a config radiologist and a database admin."""

    engine: sa.Engine
    root: Path
    settings: Settings
    status: dict[str, object] = field(default_factory=dict)
    echoes: list[str] = field(default_factory=list)
    store: Any = None
    echo_enabled: bool = True
    _app: FastAPI | None = None

    @property
    def spool(self) -> Path:
        return self.settings.storage.spool_dir

    @property
    def results(self) -> Path:
        return self.spool.parent / "results"

    def app(self, **overrides: Any) -> FastAPI:
        """The default app (built once), or a new one with ``create_app`` overrides."""
        if self._app is None or overrides:

            def echo(name: str) -> tuple[bool, str]:
                self.echoes.append(name)
                return (name != "down", "C-ECHO success" if name != "down" else "refused")

            kwargs: dict[str, Any] = {
                "store": self.store,
                "status": (lambda: dict(self.status)) if self.status is not None else None,
                "echo": echo if self.echo_enabled else None,
            }
            kwargs.update(overrides)
            settings = kwargs.pop("settings", self.settings)
            app = create_app(settings, self.engine, **kwargs)
            if overrides:
                return app
            self._app = app
        return self._app

    def client(self, role: str | None = None, **overrides: Any) -> TestClient:
        """A client, logged in as ``rad`` (radiologist) or ``ann`` (admin) when asked."""
        c = TestClient(self.app(**overrides), follow_redirects=False)
        if role is not None:
            name = {"radiologist": "rad", "admin": "ann"}[role]
            ctx: WebContext = c.app.state.ctx  # type: ignore[attr-defined]
            cookie, csrf = ctx.sessions.create(Principal(name, role), "testclient")
            c.cookies.set(SESSION_COOKIE, cookie)
            c.headers["X-CSRF-Token"] = csrf
        return c


def make_settings(root: Path, rad_hash: str, **web: Any) -> Settings:
    raw = {
        "storage": {"spool_dir": str(root / "spool"), "min_free_mb": 1},
        "web": {
            "secret_key": "test-secret-key-0123456789",
            "users": [{"name": "rad", "role": "radiologist", "password_hash": rad_hash}],
            **web,
        },
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11113},
            {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": 11114},
        ],
    }
    return from_dict(raw, root, {})


@pytest.fixture
def web(engine: sa.Engine, tmp_path: Path, rad_hash: str, admin_hash: str) -> Iterator[Web]:
    add_admin(engine, admin_hash)
    settings = make_settings(tmp_path, rad_hash)
    settings.storage.spool_dir.mkdir(parents=True)
    yield Web(
        engine=engine,
        root=tmp_path,
        settings=settings,
        status={
            "scp_listening": True,
            "scheduler_running": True,
            "live_model": "fusion:v1",
            "spool_free_mb": 5000,
            "min_free_mb": 100,
        },
    )


def login_form(client: TestClient, name: str, password: str, next_url: str = "/") -> Any:
    """Log in through the real form (login CSRF token included)."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    return client.post(
        "/login",
        data={
            "username": name,
            "password": password,
            "csrf_token": token.group(1),
            "next": next_url,
        },
    )


def png(
    path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 40)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0] = np.linspace(0, color[0], size[0], dtype=np.uint8)[None, :]
    arr[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = color
    Image.fromarray(arr).save(path)
    return path


def study_uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.999.{n}"


def seed_study(
    web: Web,
    n: int,
    *,
    state: str = "QUEUED",
    reason: str | None = None,
    priority: int = 0,
    received_ago: float = 600.0,
    study_date: str | None = "20250301",
    scored: Mapping[str, Any] | None = None,
    deliveries: list[tuple[str, str, str, str | None]] = (),  # type: ignore[assignment]
    instances: int = 3,
    now: datetime | None = None,
) -> str:
    """One study with series, instance files, events, and (``scored``) a result.

    ``scored`` keys: fusion, cbam, flag, priority, slices, key, images (bool), sr, threshold,
    slice_indices (series position of each of ``slices``; ``key`` is a series position),
    decision (ScoreSummary fields of a calibrated study: raw_probability, operating_point...).
    ``deliveries``: (destination, kind, state, last_error).
    """
    uid = study_uid(n)
    series_uid = f"{uid}.1"
    now = now or utcnow()
    first = now - timedelta(seconds=received_ago)
    with Session(web.engine) as s, s.begin():
        st = Study(
            study_instance_uid=uid,
            patient_id=f"PAT{n:03d}",
            accession_number=f"ACC{n:04d}",
            study_date=study_date,
            study_description="CT CHEST",
            state=state,
            state_reason=reason,
            priority=priority,
            flag=False,
            first_received_at=first,
            last_received_at=first + timedelta(seconds=5),
            updated_at=now,
        )
        s.add(st)
        s.flush()
        se = Series(
            study_id=st.id,
            series_instance_uid=series_uid,
            modality="CT",
            series_number=2,
            series_description="AXIAL 1mm",
            created_at=first,
        )
        s.add(se)
        s.flush()
        folder = web.spool / uid / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(instances):
            p = folder / f"{series_uid}.{i + 1}.dcm"
            p.write_bytes(b"\0")
            s.add(
                Instance(
                    study_id=st.id,
                    series_id=se.id,
                    sop_instance_uid=f"{series_uid}.{i + 1}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    instance_number=i + 1,
                    path=str(p),
                    size_bytes=1,
                    received_at=first,
                    file_missing=False,
                )
            )
        s.add(StudyEvent(study_id=st.id, state="RECEIVING", at=first))
        if state != "RECEIVING":
            st.completed_at = first + timedelta(seconds=35)
            s.add(
                StudyEvent(
                    study_id=st.id,
                    state="COMPLETE",
                    reason="quiet period elapsed",
                    at=st.completed_at,
                )
            )
            s.add(StudyEvent(study_id=st.id, state="QUEUED", at=st.completed_at))
        if scored is not None:
            _add_result(web, s, st, series_uid, scored, deliveries, now)
        elif state in ("FAILED", "SKIPPED"):
            s.add(StudyEvent(study_id=st.id, state=state, reason=reason, at=now))
    return uid


def _add_result(
    web: Web,
    s: Session,
    st: Study,
    series_uid: str,
    scored: Mapping[str, Any],
    deliveries: Any,
    now: datetime,
) -> Result:
    done = (st.completed_at or now) + timedelta(seconds=4)
    job = Job(
        study_id=st.id,
        kind="score",
        state="DONE",
        attempts=1,
        created_at=st.completed_at,
        started_at=st.completed_at,
        finished_at=done,
    )
    s.add(job)
    s.flush()
    details = ResultDetails(
        sr_text=scored.get(
            "sr",
            [
                "Finding: COVID-19 (SNOMED CT 840539006)",
                f"Probability {scored.get('fusion', 0.5):.2f}",
            ],
        ),
        summary=ScoreSummary(threshold=scored.get("threshold", 0.5), **scored.get("decision", {})),
        slice_indices=scored.get("slice_indices"),
    )
    if scored.get("images", True):
        folder = web.results / st.study_instance_uid
        details.images = {
            "heatmap": str(png(folder / "heatmap.png", color=(230, 60, 30))),
            "infected": str(png(folder / "infected.png", color=(40, 200, 90))),
        }
    flag = bool(scored.get("flag", False))
    slices = list(scored.get("slices", [0.1, 0.2, 0.7, 0.9, 0.4, 0.1]))
    r = Result(
        study_id=st.id,
        job_id=job.id,
        pipeline="covid-ct",
        series_instance_uid=series_uid,
        fusion_probability=scored.get("fusion"),
        cbam_probability=scored.get("cbam"),
        models={"fusion": "fusion:v1", "cbam": "cbam:v1"},
        slice_probabilities=slices,
        key_slice=scored.get("key", int(np.argmax(slices))),
        timings={"score": 3.2},
        priority=int(scored.get("priority", st.priority)),
        flag=flag,
        details=details.to_json(),
        superseded=False,
        created_at=now,
    )
    s.add(r)
    s.flush()
    st.flag = flag
    st.priority = r.priority
    st.scored_at = job.finished_at
    st.state = "SCORED"
    s.add(StudyEvent(study_id=st.id, state="SCORING", at=job.started_at))
    s.add(StudyEvent(study_id=st.id, state="SCORED", at=job.finished_at))
    for dest, kind, dstate, err in deliveries:
        s.add(
            Delivery(
                study_id=st.id,
                result_id=r.id,
                destination=dest,
                object_kind=kind,
                sop_instance_uid=f"{st.study_instance_uid}.9.{kind}",
                path="/dev/null",
                state=dstate,
                attempts=1 if dstate != "DEAD" else 8,
                last_error=err,
                delivered_at=now if dstate == "DELIVERED" else None,
                created_at=now,
            )
        )
    if deliveries and all(d[2] == "DELIVERED" for d in deliveries):
        st.state = "DELIVERED"
        st.delivered_at = (job.finished_at or now) + timedelta(seconds=2)
        s.add(StudyEvent(study_id=st.id, state="DELIVERED", at=st.delivered_at))
    return r


@pytest.fixture
def seed(web: Web) -> Callable[..., str]:
    def make(n: int, **kw: Any) -> str:
        return seed_study(web, n, **kw)

    return make
