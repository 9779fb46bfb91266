"""No patient data in any log line: a full run of the real daemon at DEBUG, then a grep.

A synthetic study with generated, distinctive Patient ID / Patient Name / Accession /
birth date goes storescu -> triaged serve -> scoring -> delivery to a storescp PACS; the
web pages are read; then a second study is refused by the database (a constraint the
test adds, so the error carries the study's values as bound parameters and, on
PostgreSQL, in the server's DETAIL line). None of the identifiers may appear in the
daemon's stdout/stderr. SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydicom
import sqlalchemy as sa

from tests.conftest import free_port, storescu
from tests.test_scoring_e2e import (  # noqa: F401 - fixtures
    model_store,
    pacs_factory,
    pipeline_file,
    scoring_daemon,
)
from triaged.synthetic import generate_study
from triaged.web.auth import hash_password

ADMIN_PASSWORD = "phi-test-admin-1"


def _identify(files: list[Path], ids: dict[str, str]) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID = ids["pid"]
        ds.PatientName = f"{ids['family']}^{ids['given']}"
        ds.AccessionNumber = ids["accession"]
        ds.PatientBirthDate = ids["birth"]
        ds.save_as(f)


def _identifiers(n: int) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8].upper()
    return {
        "pid": f"PID{tag}{n}",
        "family": f"QXF{tag}{n}",
        "given": f"ZVG{tag}{n}",
        "accession": f"AC{tag}{n}",
        "birth": f"19{n}{int(tag[:4], 16) % 9 + 1}0{n + 3}1{n}",
    }


def _force_database_error(url: str, accession: str) -> None:
    """Make the database refuse a study with this accession (with its values bound)."""
    eng = sa.create_engine(url)
    try:
        with eng.begin() as c:
            if eng.dialect.name == "sqlite":
                c.exec_driver_sql(
                    "CREATE TRIGGER phi_probe BEFORE INSERT ON studies WHEN "
                    f"NEW.accession_number = '{accession}' "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            else:
                c.exec_driver_sql(
                    "ALTER TABLE studies ADD CONSTRAINT phi_probe CHECK "
                    f"(accession_number IS DISTINCT FROM '{accession}')"
                )
    finally:
        eng.dispose()


def _browse(url: str, uid: str, pid: str) -> None:
    with httpx.Client(base_url=url, follow_redirects=False, timeout=60) as c:
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token
        bad = c.post(
            "/login",
            data={"username": "admin", "password": "wrong-password", "csrf_token": token.group(1)},
        )
        assert bad.status_code == 401
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token
        r = c.post(
            "/login",
            data={"username": "admin", "password": ADMIN_PASSWORD, "csrf_token": token.group(1)},
        )
        assert r.status_code == 303
        worklist = c.get("/")
        assert worklist.status_code == 200 and pid in worklist.text  # the data is there
        for path in (
            f"/studies/{uid}",
            "/api/studies",
            f"/api/studies/{uid}",
            f"/api/studies/{uid}/feedback",
            "/admin",
            "/metrics",
            "/healthz",
            "/studies/1.2.3.4.404",
        ):
            assert c.get(path).status_code in (200, 404, 503), path


def _wait_for(d: Any, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{d.log()[-3000:]}"
        time.sleep(0.2)


def test_no_patient_data_in_logs(
    make_daemon,
    pacs_factory,  # noqa: F811
    pipeline_file,  # noqa: F811
    tmp_path,
    db_url,
) -> None:
    good, refused = _identifiers(1), _identifiers(2)
    study = generate_study(tmp_path / "s1", seed=41, positive=True, slices=12, size=64)
    _identify(study.files, good)
    other = generate_study(tmp_path / "s2", seed=42, positive=False, slices=4, size=64)
    _identify(other.files, refused)

    pacs = pacs_factory()
    web_port = free_port()
    d = scoring_daemon(make_daemon, pipeline_file, pacs.port, db_url)
    d.extra |= {
        "logging": {"level": "DEBUG"},
        "web": {
            "enabled": True,
            "port": web_port,
            "secret_key": "phi-test-secret-0123456789",
            "users": [
                {"name": "admin", "role": "admin", "password_hash": hash_password(ADMIN_PASSWORD)}
            ],
        },
    }
    d.start()
    out = storescu(d.port, *study.files)
    assert out.returncode == 0, out.stderr
    d.wait_state("DELIVERED", timeout=180)
    delivered = pacs.datasets()
    assert delivered and all(ds.PatientID == good["pid"] for ds in delivered)
    _browse(f"http://127.0.0.1:{web_port}", study.study_instance_uid, good["pid"])

    _force_database_error(d.db_url, refused["accession"])
    storescu(d.port, *other.files)
    _wait_for(d, "database error while recording")
    d.stop()

    log = d.log()
    leaked = [v for ids in (good, refused) for v in ids.values() if v in log]
    assert leaked == [], [line for line in log.splitlines() if any(v in line for v in leaked)]
    assert "SQL parameters hidden" in log  # the error was logged, without its values
    assert " DEBUG " in log  # the run really logged at DEBUG
