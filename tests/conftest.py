"""Shared fixtures: database backends, a real `triaged serve` process, dcmtk peers.

Every database test runs on SQLite and on PostgreSQL. PostgreSQL is the local cluster
that `.ci/run` starts; each test gets a database of its own, created and dropped here.
TRIAGED_TEST_PG (a SQLAlchemy URL to an admin database) points elsewhere if needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "TRIAGED_TEST_PG", "postgresql+psycopg://root@/postgres?host=/var/run/postgresql"
)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on loopback ``port``.

    A peer started with Popen needs a moment before it listens; a fixed sleep is a race
    on a loaded machine (the first send would fail with "connection refused").
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout} s") from None
            time.sleep(0.05)


def _pg_database(tag: str) -> Iterator[str]:
    name = f"triaged_test_{tag}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'worklist.db'}"
    else:
        yield from _pg_database("db")


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    from triaged.worklist import db

    eng = db.make_engine(db_url)
    db.upgrade(eng)
    yield eng
    eng.dispose()


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a TOML config; a list of dicts becomes an array of tables."""
    lines: list[str] = []
    for key, value in sections.items():
        if not isinstance(value, (dict, list)) or (
            isinstance(value, list) and not all(isinstance(x, dict) for x in value)
        ):
            lines.insert(0, f"{key} = {toml_value(value)}")
    for key, value in sections.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Daemon:
    """A real `triaged serve` process on loopback, restartable and killable."""

    root: Path
    db_url: str
    port: int
    ae_title: str = "TRIAGED"
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "serve.log"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def write_config(self) -> None:
        sections: dict[str, Any] = {
            "pipelines": [],
            "dicom": {"ae_title": self.ae_title, "port": self.port},
            "storage": {"spool_dir": "spool", "min_free_mb": 1},
            "database": {"url": self.db_url},
            "assembly": {"quiet_seconds": 1.5, "max_wait_seconds": 120, "sweep_seconds": 0.25},
            "web": {"enabled": False},
            "worker": {"in_process": 0},
        }
        for k, v in self.extra.items():
            if isinstance(v, dict) and isinstance(sections.get(k), dict):
                sections[k] = {**sections[k], **v}
            else:
                sections[k] = v
        write_config(self.config, sections)

    def start(self, timeout: float = 60) -> Daemon:
        self.write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triaged.cli", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"triaged serve exited:\n{self.log()}")
            if b"triaged ready" in self.log_path.read_bytes()[offset:]:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"triaged serve did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "triaged.cli", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def worklist(self) -> list[dict[str, Any]]:
        import json

        out = self.cli("worklist", "--json")
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))

    def wait_state(self, state: str, n: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until ``n`` studies are in ``state``; fail at once on an unexpected dead end."""
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        dead_ends = {"FAILED", "SKIPPED"} - {state}
        while time.monotonic() < deadline:
            rows = self.worklist()
            if sum(r["state"] == state for r in rows) >= n:
                return rows
            stuck = [r for r in rows if r["state"] in dead_ends]
            if stuck:
                raise AssertionError(
                    f"study ended {stuck[0]['state']}: "
                    f"{stuck[0]['state_reason']}\n{self.log()[-3000:]}"
                )
            time.sleep(0.3)
        raise TimeoutError(f"expected {n} studies in {state}, have {rows}\n{self.log()}")


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Any]:
    made: list[Daemon] = []

    def make(db_url: str | None = None, **extra: Any) -> Daemon:
        root = tmp_path / f"daemon{len(made)}"
        root.mkdir()
        d = Daemon(root, db_url or f"sqlite:///{root / 'worklist.db'}", free_port(), extra=extra)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


def storescu(
    port: int,
    *paths: Path | str,
    aet: str = "STORESCU",
    aec: str = "TRIAGED",
    extra: tuple[str, ...] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu over loopback, verbose so that every response status is printed."""
    assert shutil.which("storescu"), "dcmtk is not installed (.ci/run installs it)"
    return subprocess.run(
        [
            "storescu",
            "-v",
            "-aet",
            aet,
            "-aec",
            aec,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=timeout,
    )


def echoscu(port: int, aec: str = "TRIAGED", extra: tuple[str, ...] = ()) -> int:
    return subprocess.run(
        ["echoscu", "-aec", aec, *extra, "127.0.0.1", str(port)],
        capture_output=True,
        env=DCMTK_ENV,
        timeout=60,
    ).returncode


def store_statuses(output: str) -> list[str]:
    """The status of every C-STORE response in storescu -v output, in order."""
    return [
        line.split("Received Store Response (", 1)[1].rstrip(")").strip()
        for line in output.splitlines()
        if "Received Store Response (" in line
    ]
