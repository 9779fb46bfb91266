"""What a peer can make the listener buffer or hold, over raw sockets against a real daemon."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from tests.conftest import echoscu, store_statuses, storescu
from triaged.synthetic import generate_study

MB = 1024 * 1024
#: What the attacker streams at most; the old listener read all of it.
STREAM_LIMIT = 200 * MB
#: The server must stop accepting after about a socket buffer, far below this.
ACCEPTED_LIMIT = 1 * MB
RSS_GROWTH_LIMIT = 50 * MB


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    # A small send buffer, so that what the client counts as sent is what the server
    # side accepted give or take a few kB.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    return s


def stream_until_closed(s: socket.socket, first: bytes) -> int:
    """Send ``first`` and then zeros until the peer closes; the bytes accepted after ``first``."""
    s.sendall(first)
    chunk = bytes(64 * 1024)
    sent = 0
    try:
        while sent < STREAM_LIMIT:
            sent += s.send(chunk)
    except OSError:  # reset, broken pipe, timeout; EBADF once a pynetdicom peer closed it
        pass
    return sent


def closed_by_peer(s: socket.socket, timeout: float = 30) -> bool:
    """True when the server closes (EOF or reset) within ``timeout``; False if it stays open."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


@pytest.mark.parametrize(
    ("header", "logged"),
    [
        (pdu_header(0x01, 0xFFFF_FFF0), "A-ASSOCIATE-RQ PDU declares 4294967280 bytes"),
        (pdu_header(0x09, 1000), "unknown PDU type 0x09"),
    ],
    ids=["huge-associate-rq", "unknown-type"],
)
def test_oversized_or_unknown_pdu_is_cut_before_it_is_buffered(
    make_daemon, header: bytes, logged: str
) -> None:
    d = make_daemon().start()
    assert d.proc is not None
    before = rss(d.proc.pid)
    with connect(d.port) as s:
        accepted = stream_until_closed(s, header)
    grown = rss(d.proc.pid) - before
    assert accepted < ACCEPTED_LIMIT, f"server accepted {accepted} bytes of the PDU"
    assert grown < RSS_GROWTH_LIMIT, f"server grew by {grown} bytes"
    assert "closing DICOM connection from 127.0.0.1:" in d.log()
    assert logged in d.log()
    assert d.log().count("closing DICOM connection") == 1  # one line, no echo of the stream
    assert echoscu(d.port) == 0  # the listener is unharmed


def test_pending_connections_are_capped_and_slots_come_back(make_daemon) -> None:
    d = make_daemon(dicom={"max_pending_connections": 2, "acse_timeout": 120}).start()
    idle = [connect(d.port) for _ in range(2)]
    try:
        idle[0].sendall(pdu_header(0x01, 1000))  # a started, never finished A-ASSOCIATE-RQ
        with connect(d.port) as third:
            assert closed_by_peer(third), "a third not-associated connection was kept"
        assert "2 connections are waiting to associate" in d.log()
    finally:
        for s in idle:
            s.close()
    # The slots are freed when those peers go away; a real association gets through.
    deadline = time.monotonic() + 30
    while echoscu(d.port) != 0:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.2)


def test_trickling_association_request_is_cut_at_the_acse_timeout(make_daemon) -> None:
    d = make_daemon(dicom={"acse_timeout": 2}).start()
    with connect(d.port) as s:
        s.sendall(pdu_header(0x01, 1000) + bytes(10))  # then nothing more
        assert closed_by_peer(s), "a never-finished A-ASSOCIATE-RQ held its connection"
    assert "not associated after 2 s" in d.log()
    assert echoscu(d.port) == 0


def test_p_data_larger_than_max_pdu_aborts_instead_of_allocating(make_daemon, tmp_path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    d = make_daemon(dicom={"max_pdu": 16384}).start()
    assert d.proc is not None
    # A peer that fills our maximum PDU (32 KB slices in 16 KB PDUs) is not cut.
    study = generate_study(tmp_path / "s", seed=6, slices=2, size=128)
    out = storescu(d.port, *study.files)
    assert store_statuses(out.stderr + out.stdout) == ["Success"] * len(study.files)
    assert "closing DICOM connection" not in d.log()
    before = rss(d.proc.pid)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", d.port, ae_title="TRIAGED")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    assert raw is not None
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    raw.settimeout(30)
    try:
        accepted = stream_until_closed(raw, pdu_header(0x04, 0xFFFF_FFF0))
    finally:
        assoc.abort()
    grown = rss(d.proc.pid) - before
    assert accepted < ACCEPTED_LIMIT, f"server accepted {accepted} bytes of the PDU"
    assert grown < RSS_GROWTH_LIMIT, f"server grew by {grown} bytes"
    deadline = time.monotonic() + 30
    while "association from AE PYSCU" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    log = d.log()
    assert "P-DATA-TF PDU declares 4294967280 bytes (limit 16448)" in log
    assert "aborted: 0 stored" in log
    assert echoscu(d.port) == 0


def test_receive_core_without_the_fast_path(make_daemon, tmp_path) -> None:
    """Store, duplicate and echo with no pynetdicom internals patched ([dicom] fast_path)."""
    study = generate_study(tmp_path / "s", seed=5, slices=3, size=32)
    d = make_daemon(dicom={"fast_path": False}).start()
    out = storescu(d.port, *study.files)
    assert out.returncode == 0, out.stderr
    assert store_statuses(out.stderr + out.stdout) == ["Success"] * len(study.files)
    again = storescu(d.port, *study.files)
    assert store_statuses(again.stderr + again.stdout) == ["Success"] * len(study.files)
    assert echoscu(d.port) == 0
    log = d.log()
    assert f"released: {len(study.files)} stored, 0 duplicate" in log
    assert f"released: 0 stored, {len(study.files)} duplicate" in log
    assert "fast path off" in log


def test_silent_tls_client_does_not_stall_other_connections(make_daemon, tmp_path) -> None:
    """pynetdicom ran the TLS handshake in the accept loop, with no timeout: one peer that
    connected and said nothing stopped every later connection."""
    from tests.dicom.test_receive import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki["server.crt"]), "key": str(pki["server.key"]), "ca": str(pki["ca.crt"])}
    d = make_daemon(dicom={"tls": tls, "acse_timeout": 120}).start()
    tls_args = ("+tls", str(pki["client.key"]), str(pki["client.crt"]), "+cf", str(pki["ca.crt"]))
    with connect(d.port):  # no ClientHello, ever
        assert echoscu(d.port, extra=tls_args) == 0


def test_pdu_tracker_follows_headers_split_across_reads() -> None:
    from triaged.dicom.guard import PduTracker, pdu_limits

    tracker = PduTracker(pdu_limits(16384))
    rq = pdu_header(0x01, 10) + bytes(10)
    release = pdu_header(0x05, 4) + bytes(4)
    stream = rq + release + pdu_header(0x04, 16384 + 64) + bytes(16448)
    for i in range(0, len(stream), 5):  # headers and bodies straddle the reads
        assert tracker.feed(stream[i : i + 5], associated=True) is None
    assert tracker.feed(pdu_header(0x05, 5), associated=True) == (
        "A-RELEASE-RQ PDU declares 5 bytes (limit 4)"
    )
    fresh = PduTracker(pdu_limits(0))
    assert fresh.feed(pdu_header(0x04, 100), associated=False) == (
        "P-DATA-TF before the association was accepted"
    )
