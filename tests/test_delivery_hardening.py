"""Delivery against real dcmtk storescp peers: per-object errors and TLS host name checks.

The delivered objects here are synthetic CT instances: the sender does not care what a
result object holds, only that it is a DICOM file (or why it is not).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.conftest import DCMTK_ENV, free_port, wait_listening
from triaged.config import Destination, DestinationTLS, Settings
from triaged.delivery import deliver_due
from triaged.dicom import export
from triaged.synthetic import generate_study
from triaged.worklist import deliveries
from triaged.worklist.models import Delivery, Job, JobState, Result, Study, StudyState, utcnow


class Peer:
    """dcmtk storescp: every received object becomes its own file; ``extra`` are options
    (TLS, ``--sleep-after``)."""

    def __init__(self, root: Path, extra: tuple[str, ...] = ()) -> None:
        self.dir = root
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["storescp", "-aet", "PACS", "+uf", "-od", str(self.dir), *extra, str(self.port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def uids(self) -> list[str]:
        return sorted(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in self.dir.iterdir()
            if p.is_file()
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a test may have paused it
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Any]:
    made: list[Peer] = []

    def make(extra: tuple[str, ...] = ()) -> Peer:
        peer = Peer(tmp_path / f"peer{len(made)}", extra)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.stop()


def destination(port: int, host: str = "127.0.0.1", **tls: Any) -> Destination:
    return Destination(
        name="pacs",
        ae_title="PACS",
        host=host,
        port=port,
        tls=DestinationTLS(**tls) if tls else None,
    )


# -- finding 7: one unreadable object does not block its batch ----------------------------


def _queue_study(engine: sa.Engine, paths: list[Path], uids: list[str]) -> int:
    """A scored study with one current result whose objects are queued for "pacs"."""
    now = utcnow()
    with Session(engine) as s, s.begin():
        study = Study(
            study_instance_uid="1.2.826.0.1.3680043.10.1.7",
            state=StudyState.SCORED,
            priority=0,
            flag=False,
            first_received_at=now,
            last_received_at=now,
            updated_at=now,
        )
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            kind="score",
            state=JobState.DONE,
            attempts=1,
            created_at=now,
            started_at=now,
            finished_at=now,
        )
        s.add(job)
        s.flush()
        result = Result(
            study_id=study.id,
            job_id=job.id,
            pipeline="covid-ct",
            series_instance_uid="1.2.3.1",
            fusion_probability=0.9,
            cbam_probability=None,
            models={},
            slice_probabilities=[0.9],
            key_slice=0,
            timings={},
            priority=90,
            flag=True,
            details={},
            superseded=False,
            created_at=now,
        )
        s.add(result)
        s.flush()
        objects = [
            deliveries.QueuedObject("SC", uid, str(p)) for p, uid in zip(paths, uids, strict=True)
        ]
        deliveries.queue(s, study.id, result.id, objects, ["pacs"], now)
        return study.id


def _deliveries(engine: sa.Engine) -> dict[str, tuple[str, int, str | None]]:
    with Session(engine) as s:
        rows = s.scalars(sa.select(Delivery)).all()
        return {Path(d.path).name: (d.state, d.attempts, d.last_error) for d in rows}


def test_unreadable_result_files_are_dead_lettered_and_the_rest_go_out(
    engine: sa.Engine, peers: Any, tmp_path: Path
) -> None:
    peer = peers()
    study = generate_study(tmp_path / "s", seed=71, slices=4, size=32)
    paths = list(study.files)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    study_id = _queue_study(engine, paths, uids)
    paths[1].unlink()  # e.g. removed by hand, or a results disk that was replaced
    paths[2].write_bytes(b"not a DICOM file\n" * 20)  # e.g. truncated and overwritten
    settings = Settings(destinations=[destination(peer.port)])

    assert deliver_due(engine, settings) == 2
    assert peer.uids() == sorted([uids[0], uids[3]])
    rows = _deliveries(engine)
    assert rows[paths[0].name][:2] == rows[paths[3].name][:2] == ("DELIVERED", 1)
    assert rows[paths[1].name] == ("DEAD", 1, f"result file {paths[1].name} is missing")
    assert rows[paths[2].name] == ("DEAD", 1, f"result file {paths[2].name} is not DICOM")
    with Session(engine) as s:
        st = s.get(Study, study_id)
        assert st is not None and st.state == StudyState.FAILED
        assert st.state_reason is not None and "is missing" in st.state_reason
        assert study.patient_id not in st.state_reason

    # the dead letters are not retried and nothing is sent twice
    for _ in range(2):
        assert deliver_due(engine, settings) == 0
    assert _deliveries(engine) == rows
    assert peer.uids() == sorted([uids[0], uids[3]])


# -- finding 9: TLS verifies the destination's host name ----------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(folder: Path, name: str, san: str) -> tuple[Path, Path]:
    """A key and a certificate signed by the folder's CA, for ``san``."""
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=folder,
    )
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=folder,
    )
    return folder / f"{name}.key", folder / f"{name}.crt"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA; a PACS certificate for pacs.example, one for localhost; our client's."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=folder,
    )
    out = {"ca": folder / "ca.crt"}
    for name, san in [
        ("pacs.example", "DNS:pacs.example"),
        ("localhost", "DNS:localhost"),
        ("client", "DNS:triaged.example"),
    ]:
        out[f"{name}.key"], out[f"{name}.crt"] = _issue(folder, name, san)
    return out


def _tls_peer(peers: Any, pki: dict[str, Path], name: str) -> Peer:
    return peers(("+tls", str(pki[f"{name}.key"]), str(pki[f"{name}.crt"]), "+cf", str(pki["ca"])))


def _client(pki: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"cert": pki["client.crt"], "key": pki["client.key"], **extra}


def _send_one(dest: Destination, path: Path) -> export.SendResult:
    (result,) = export.send(dest, [path], "TRIAGED", timeout=20)
    return result


@pytest.fixture(scope="module")
def one_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_study(tmp_path_factory.mktemp("s"), seed=72, slices=1, size=32).files[0]


def test_tls_certificate_for_another_host_is_refused_by_default(
    peers: Any, pki: dict[str, Path], one_object: Path
) -> None:
    peer = _tls_peer(peers, pki, "pacs.example")  # we connect to 127.0.0.1
    dest = destination(peer.port, **_client(pki, ca=pki["ca"]))
    result = _send_one(dest, one_object)
    assert result.outcome == export.Outcome.REFUSED
    assert result.detail.startswith("TLS certificate of 127.0.0.1 not accepted: ")
    assert "IP address mismatch" in result.detail
    ok, why = export.echo(dest, "TRIAGED")
    assert not ok and "IP address mismatch" in why
    assert peer.uids() == []

    # without `ca` the system trust store decides: the private CA is not in it
    named = _tls_peer(peers, pki, "localhost")
    result = _send_one(destination(named.port, host="localhost", **_client(pki)), one_object)
    assert result.outcome == export.Outcome.REFUSED
    assert result.detail.startswith("TLS certificate of localhost not accepted: ")
    assert "self-signed certificate in certificate chain" in result.detail
    assert named.uids() == []


def test_tls_host_name_check_can_be_turned_off_explicitly(
    peers: Any, pki: dict[str, Path], one_object: Path
) -> None:
    peer = _tls_peer(peers, pki, "pacs.example")
    tls = _client(pki, ca=pki["ca"], verify_hostname=False)
    result = _send_one(destination(peer.port, **tls), one_object)
    assert (result.outcome, result.detail) == (export.Outcome.DELIVERED, "status 0x0000")
    assert peer.uids() == [str(pydicom.dcmread(one_object).SOPInstanceUID)]


def test_tls_certificate_naming_the_host_is_accepted(
    peers: Any, pki: dict[str, Path], one_object: Path
) -> None:
    peer = _tls_peer(peers, pki, "localhost")
    dest = destination(peer.port, host="localhost", **_client(pki, ca=pki["ca"]))
    result = _send_one(dest, one_object)
    assert (result.outcome, result.detail) == (export.Outcome.DELIVERED, "status 0x0000")
    assert export.echo(dest, "TRIAGED") == (True, "C-ECHO succeeded")
    assert peer.uids() == [str(pydicom.dcmread(one_object).SOPInstanceUID)]


def test_verify_hostname_is_a_destination_option_only(tmp_path: Path) -> None:
    from triaged.config import ConfigError, from_dict

    tls = {"cert": "c.crt", "key": "c.key", "verify_hostname": False}
    dest = {"name": "pacs", "ae_title": "PACS", "host": "pacs.local", "port": 104}
    settings = from_dict({"destinations": [{**dest, "tls": tls}]}, tmp_path, environ={})
    (parsed,) = settings.destinations
    assert parsed.tls is not None and parsed.tls.verify_hostname is False
    assert parsed.tls.cert == tmp_path / "c.crt"  # still anchored at the config's folder
    default = from_dict(
        {"destinations": [{**dest, "tls": {"cert": "c", "key": "k"}}]}, tmp_path, environ={}
    )
    assert default.destinations[0].tls is not None
    assert default.destinations[0].tls.verify_hostname is True
    with pytest.raises(ConfigError, match=r"unknown key 'dicom\.tls\.verify_hostname'"):
        from_dict({"dicom": {"tls": tls}}, tmp_path, environ={})
