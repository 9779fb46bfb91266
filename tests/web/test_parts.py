"""Pieces of the web front end that need no database backend: the plot, formatting, the
threaded server, and that migration 0002 matches the web models."""

from __future__ import annotations

import socket
import ssl
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi import FastAPI

from triaged.config import TLSSettings, from_dict
from triaged.web.app import fmt_age, fmt_pct, fmt_time
from triaged.web.plot import slice_plot_svg
from triaged.web.queries import label_for, model_version
from triaged.web.server import serve_in_thread, start_web
from triaged.worklist import db
from triaged.worklist.models import Base
from triaged.worklist.web_models import AuditEntry  # noqa: F401  (registers the tables)

SVG = "{http://www.w3.org/2000/svg}"


def test_slice_plot_marks_threshold_and_key_slice() -> None:
    svg = slice_plot_svg([0.1, 0.4, 0.95, 0.2], threshold=0.5, key_slice=2, width=400, height=200)
    root = ET.fromstring(svg)
    line = root.find(f"{SVG}polyline")
    assert line is not None
    pts = [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]
    assert len(pts) == 4 and pts[0][0] < pts[1][0] < pts[2][0] < pts[3][0]
    assert min(pts, key=lambda p: p[1]) == pts[2]  # highest probability is highest on screen
    thr = next(e for e in root.iter(f"{SVG}line") if e.attrib.get("class") == "threshold")
    key = next(e for e in root.iter(f"{SVG}line") if e.attrib.get("class") == "key")
    assert float(key.attrib["x1"]) == pytest.approx(pts[2][0], abs=0.1)
    # threshold 0.5 sits halfway between the 0 and 1 grid lines
    grid = sorted(
        float(e.attrib["y1"]) for e in root.iter(f"{SVG}line") if e.attrib.get("class") == "grid"
    )
    assert float(thr.attrib["y1"]) == pytest.approx((grid[0] + grid[-1]) / 2, abs=0.1)
    title = root.find(f"{SVG}title")
    assert title is not None and title.text == (
        "4 slices, 1 at or above 0.50, maximum 0.95, key slice 3"
    )
    assert "style=" not in svg  # a strict CSP forbids inline styles


def test_slice_plot_empty_and_single() -> None:
    assert "no slice scores" in slice_plot_svg([], 0.5)
    one = ET.fromstring(slice_plot_svg([0.7], 0.5, key_slice=0))
    assert one.find(f"{SVG}circle") is not None


def test_formatting() -> None:
    assert fmt_pct(None) == "–" and fmt_pct(0.876) == "88%"
    assert [fmt_age(s) for s in (5, 60 * 7, 3600 * 2 + 300, 86400 * 3 + 3600 * 4)] == [
        "<1 min",
        "7 min",
        "2 h 05",
        "3 d 4 h",
    ]
    assert fmt_time("2025-01-02T03:04:05+00:00") == "2025-01-02 03:04:05 UTC"
    assert model_version({"fusion": "fusion:v3", "cbam": "v1"}) == "cbam:v1, fusion:v3"
    assert model_version({}) is None


def test_label_semantics() -> None:
    assert label_for(True, "confirm") == "covid"
    assert label_for(True, "refute") == "non-covid"
    assert label_for(False, "confirm") == "non-covid"
    assert label_for(False, "refute") == "covid"


def test_migration_matches_models(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    web_tables = {"web_users", "web_sessions", "feedback", "audit_log"}
    assert web_tables <= set(Base.metadata.tables)
    assert [d for d in diff if any(t in repr(d) for t in web_tables)] == []
    engine.dispose()


def _hello() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return app


def test_serve_in_thread_starts_and_stops() -> None:
    server = serve_in_thread(_hello(), "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{server.url}/ping", timeout=5).json() == {"pong": "yes"}
    finally:
        server()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/ping", timeout=2)


def test_serve_in_thread_reports_a_taken_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="did not start"):
            serve_in_thread(_hello(), "127.0.0.1", port, timeout=10)


def test_serve_in_thread_with_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = serve_in_thread(_hello(), "127.0.0.1", 0, TLSSettings(cert=cert, key=key))
    try:
        assert server.url.startswith("https://")
        assert (
            httpx.get(
                f"{server.url}/ping", verify=ssl.create_default_context(cafile=str(cert)), timeout=5
            ).status_code
            == 200
        )
    finally:
        server.stop()


def test_start_web_follows_the_config(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    db.upgrade(engine)
    off = from_dict({"web": {"enabled": False}}, tmp_path, {})
    assert start_web(off, engine) is None
    on = from_dict({"web": {"port": 0, "secret_key": "k" * 32}}, tmp_path, {})
    server = start_web(on, engine, status=lambda: {"scp_listening": False})
    assert server is not None
    try:
        assert server.url.startswith("http://127.0.0.1:")  # default bind is loopback
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 503
        assert httpx.get(f"{server.url}/login", timeout=5).status_code == 200
    finally:
        server.stop()
        engine.dispose()
