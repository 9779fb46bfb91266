"""Receiving studies from real DICOM peers (dcmtk) over loopback: nothing lost, nothing twice."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from tests.conftest import DCMTK_ENV, echoscu, store_statuses, storescu
from triaged.synthetic import generate_study

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def spool_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*.dcm") if ".incoming" not in p.parts)


def db_instances(url: str) -> list[tuple[str, str, bool]]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            rows = c.execute(
                sa.text("SELECT sop_instance_uid, path, file_missing FROM instances")
            ).all()
    finally:
        eng.dispose()
    return [(r[0], r[1], bool(r[2])) for r in rows]


def test_echo(make_daemon) -> None:
    d = make_daemon().start()
    assert echoscu(d.port) == 0


def test_multiseries_study_completes_with_exact_counts(make_daemon, db_url, tmp_path) -> None:
    study = generate_study(
        tmp_path / "study", seed=3, slices=12, size=64, extra_series=("localizer", "thick", "sc")
    )
    d = make_daemon(db_url).start()
    out = storescu(d.port, *study.files)
    assert out.returncode == 0, out.stderr
    statuses = store_statuses(out.stderr + out.stdout)
    assert statuses == ["Success"] * len(study.files)
    rows = d.wait_state("QUEUED")
    assert len(rows) == 1
    row = rows[0]
    assert row["study_instance_uid"] == study.study_instance_uid
    assert row["num_series"] == len(study.series)
    assert row["num_instances"] == len(study.files)
    assert row["patient_id"] == study.patient_id
    assert row["accession_number"] == study.accession_number
    assert row["completed_at"] is not None
    assert set(row["modalities"]) >= {"CT"}
    assert len(spool_files(d.spool)) == len(study.files)
    # The same study again: stored once; an exact resend leaves the queued study alone.
    out = storescu(d.port, *study.files)
    assert store_statuses(out.stderr + out.stdout) == ["Success"] * len(study.files)
    rows = d.wait_state("QUEUED")
    assert rows[0]["num_instances"] == len(study.files)
    assert len(db_instances(db_url)) == len(study.files)
    assert "released: 0 stored" in d.log()


def test_unknown_calling_ae_is_refused(make_daemon, tmp_path) -> None:
    study = generate_study(tmp_path / "s", seed=1, slices=2, size=32)
    d = make_daemon(dicom={"allowed_calling_aets": ["PACS"]}).start()
    refused = storescu(d.port, *study.files, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    accepted = storescu(d.port, *study.files, aet="PACS")
    assert accepted.returncode == 0, accepted.stderr
    wrong_called = storescu(d.port, *study.files, aet="PACS", aec="OTHER")
    assert "Called AE Title Not Recognized" in wrong_called.stderr
    assert "rejected" in d.log()
    assert len(spool_files(d.spool)) == len(study.files)


def test_bad_dataset_fails_and_association_continues(make_daemon, tmp_path) -> None:
    study = generate_study(tmp_path / "s", seed=2, slices=2, size=32)
    good = study.files
    ds = pydicom.dcmread(good[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    del ds.StudyInstanceUID
    no_uid = tmp_path / "no_study_uid.dcm"
    ds.save_as(no_uid)
    d = make_daemon().start()
    out = storescu(d.port, no_uid, *good, extra=("--no-halt",))
    statuses = store_statuses(out.stderr + out.stdout)
    assert statuses[0].startswith("Error"), statuses
    assert statuses[1:] == ["Success"] * len(good)
    assert echoscu(d.port) == 0
    assert "refused with 0xA900: missing StudyInstanceUID" in d.log()


def test_unparseable_dataset_from_pynetdicom_peer(make_daemon, tmp_path) -> None:
    """A truncated dataset on the wire (dcmtk will not send one, pynetdicom will)."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    study = generate_study(tmp_path / "s", seed=4, slices=2, size=32)
    raw = study.files[0].read_bytes()
    ds = pydicom.dcmread(study.files[0])
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(raw[: len(raw) // 3])
    d = make_daemon().start()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", d.port, ae_title="TRIAGED")
        assert assoc.is_established
        st_bad = assoc.send_c_store(broken)
        st_good = assoc.send_c_store(study.files[1])
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert st_bad.Status in (0xC000, 0xA900), hex(st_bad.Status)
    assert st_good.Status == 0x0000
    assert len(spool_files(d.spool)) == 1
    assert echoscu(d.port) == 0


#: storescu's option that proposes a file's own (compressed) transfer syntax unconverted
PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def send_unconverted(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    """One association per file, proposing the file's own transfer syntax."""
    try:
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:
        ts = ""
    extra = (PROPOSE[ts],) if ts in PROPOSE else ()
    return storescu(port, path, extra=extra, timeout=60)


def _compressed_samples(out: Path) -> list[Path]:
    """One pydicom sample per compressed syntax, copied with its own SOP Instance UID."""
    wanted = {
        "JPEG Baseline (Process 1)",
        "JPEG Extended (Process 2 and 4)",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        "JPEG-LS Lossless Image Compression",
        "JPEG-LS Lossy (Near-Lossless) Image Compression",
        "JPEG 2000 Image Compression (Lossless Only)",
        "JPEG 2000 Image Compression",
        "RLE Lossless",
        "Deflated Explicit VR Little Endian",
    }
    chosen: dict[str, Path] = {}
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(PYDICOM_FILES.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(p)
            name = ds.file_meta.TransferSyntaxUID.name
        except Exception:
            continue
        if name not in wanted or name in chosen or "PixelData" not in ds:
            continue
        try:
            ds.pixel_array  # noqa: B018 - only samples that pydicom itself can decode
        except Exception:
            continue
        # several samples are one image in several syntaxes with one SOP Instance UID: give
        # each copy its own, or the spool rightly stores only the first
        for k in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(k):
                setattr(ds, k, generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copy = out / p.name
        ds.save_as(copy)
        chosen[name] = copy
    assert set(chosen) == wanted, wanted - set(chosen)
    return list(chosen.values())


def test_compressed_transfer_syntaxes_are_stored_and_decode(make_daemon, tmp_path) -> None:
    samples = _compressed_samples(tmp_path / "samples")
    study = generate_study(
        tmp_path / "rle", seed=5, slices=2, size=32, transfer_syntax="RLELossless"
    )
    d = make_daemon().start()
    for f in [*samples, *study.files]:
        out = send_unconverted(d.port, f)
        assert store_statuses(out.stderr + out.stdout) == ["Success"], (f, out.stderr)
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in spool_files(d.spool)}
    for src in [*samples, *study.files]:
        orig = pydicom.dcmread(src)
        got = pydicom.dcmread(stored[orig.SOPInstanceUID])
        assert got.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
        np.testing.assert_array_equal(got.pixel_array, orig.pixel_array)


def test_pydicom_test_files_all_get_an_answer(make_daemon) -> None:
    """Every file storescu can put on the wire gets a status; the daemon keeps serving."""
    files = sorted(p for p in PYDICOM_FILES.glob("*.dcm"))
    d = make_daemon().start()
    answered = refused = 0
    for f in files:
        out = send_unconverted(d.port, f)
        text = out.stderr + out.stdout
        if "Sending Store Request" not in text or "Failed to send message" in text:
            continue  # storescu itself could not read or encode the file
        statuses = store_statuses(text)
        assert len(statuses) == 1, (f, text[-2000:])
        answered += 1
        refused += statuses[0] != "Success"
    assert answered > 50
    assert refused >= 2  # the truncated and malformed samples are refused, not stored
    assert echoscu(d.port) == 0
    assert d.proc is not None and d.proc.poll() is None


def test_out_of_space_refuses_and_leaves_nothing(make_daemon, db_url, tmp_path) -> None:
    study = generate_study(tmp_path / "s", seed=6, slices=3, size=32)
    d = make_daemon(db_url, storage={"min_free_mb": 1 << 40}).start()
    out = storescu(d.port, *study.files, extra=("--no-halt",))
    statuses = store_statuses(out.stderr + out.stdout)
    assert statuses == ["Error: OutOfResources"] * len(study.files) or all(
        "Out" in s and "Resources" in s for s in statuses
    ), statuses
    assert spool_files(d.spool) == []
    assert list((d.spool / ".incoming").iterdir()) == []
    assert db_instances(db_url) == []
    assert echoscu(d.port) == 0


def test_sigkill_during_transfer_loses_nothing_acknowledged(make_daemon, db_url, tmp_path):
    study = generate_study(tmp_path / "s", seed=7, slices=120, size=256)
    d = make_daemon(db_url).start()
    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", "TRIAGED", "127.0.0.1", str(d.port), *map(str, study.files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=DCMTK_ENV,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(spool_files(d.spool)) < 30:
        time.sleep(0.02)
    d.kill()
    first_out, _ = proc.communicate(timeout=60)
    acked = store_statuses(first_out).count("Success")
    assert 0 < acked < len(study.files), "the kill should land mid-transfer"
    d.start()
    rows = db_instances(db_url)
    assert len(rows) >= acked
    assert all(Path(p).is_file() and not missing for _, p, missing in rows)
    assert list((d.spool / ".incoming").iterdir()) == []
    out = storescu(d.port, *study.files)
    assert store_statuses(out.stderr + out.stdout) == ["Success"] * len(study.files)
    rows = db_instances(db_url)
    uids = [u for u, _, _ in rows]
    assert len(uids) == len(set(uids)) == len(study.files)
    assert len(spool_files(d.spool)) == len(study.files)
    assert d.wait_state("QUEUED")[0]["num_instances"] == len(study.files)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> dict[str, Path]:
    """A private CA with a server and a client certificate (for mutual TLS)."""
    folder.mkdir(parents=True, exist_ok=True)
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
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        ext = folder / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
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
            ext.name,
            "-out",
            f"{name}.crt",
            cwd=folder,
        )
    return {
        n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
    }


def test_tls_association(make_daemon, tmp_path) -> None:
    pki = make_pki(tmp_path / "pki")
    study = generate_study(tmp_path / "s", seed=8, slices=2, size=32)
    tls = {"cert": str(pki["server.crt"]), "key": str(pki["server.key"]), "ca": str(pki["ca.crt"])}
    d = make_daemon(dicom={"tls": tls}).start()
    tls_args = ("+tls", str(pki["client.key"]), str(pki["client.crt"]), "+cf", str(pki["ca.crt"]))
    ok = storescu(d.port, *study.files, extra=tls_args)
    assert ok.returncode == 0, ok.stderr
    assert store_statuses(ok.stderr + ok.stdout) == ["Success"] * len(study.files)
    plain = storescu(d.port, *study.files)
    assert plain.returncode != 0
    no_client_cert = storescu(d.port, *study.files, extra=("+tla", "+cf", str(pki["ca.crt"])))
    assert no_client_cert.returncode != 0
    assert echoscu(d.port, extra=tls_args) == 0
    assert len(spool_files(d.spool)) == len(study.files)


@pytest.mark.parametrize("bad", ["dicom.prot = 1", "storage.min_free_mb = -5"])
def test_bad_config_is_one_line_exit_2(tmp_path, bad) -> None:
    import sys

    section, assignment = bad.split(".", 1)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[{section}]\n{assignment}\n")
    out = subprocess.run(
        [sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    key = assignment.split(" ")[0]
    assert f"{section}.{key}" in out.stderr
    assert "Traceback" not in out.stderr
