"""The reactor wake-up proxy routes only the acceptor's 1 ms nap to the DIMSE queue."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynetdicom.association as pa
import pytest

from triaged.dicom import reactor


class _RecordingTime:
    """Stands in for the time module: records sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.monotonic = lambda: 42.0

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def _assoc() -> Any:
    return SimpleNamespace(dimse=SimpleNamespace(msg_queue=queue.Queue()))


def _in_thread(fn: Any) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as err:  # re-raised in the test thread
            errors.append(err)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def test_install_is_idempotent_and_keeps_time_functions() -> None:
    assert reactor.install()
    assert reactor.install()
    assert isinstance(pa.time, reactor._ReactorClock)
    assert pa.time.monotonic() > 0  # everything but sleep is the real module


def test_unregistered_threads_and_other_naps_sleep_normally() -> None:
    real = _RecordingTime()
    clock = reactor._ReactorClock(real)  # type: ignore[arg-type]
    clock.sleep(reactor.REACTOR_NAP)  # this thread registered nothing

    def registered() -> None:
        reactor.register(_assoc())
        clock.sleep(0.0001)  # the DIMSE waits of the requestor side
        clock.sleep(0.1)

    _in_thread(registered)
    assert real.slept == [reactor.REACTOR_NAP, 0.0001, 0.1]
    assert clock.monotonic() == 42.0


def test_registered_nap_returns_when_a_message_is_queued() -> None:
    real = _RecordingTime()
    clock = reactor._ReactorClock(real)  # type: ignore[arg-type]
    assoc = _assoc()
    woke = threading.Event()

    def registered() -> None:
        reactor.register(assoc)
        assoc.dimse.msg_queue.put((1, "C-STORE-RQ"))
        clock.sleep(reactor.REACTOR_NAP)  # a message is waiting: no nap at all
        woke.set()

    _in_thread(registered)
    assert woke.is_set()
    assert real.slept == []  # the queue's condition replaced the sleep
    assert assoc.dimse.msg_queue.get_nowait() == (1, "C-STORE-RQ")  # not consumed


@pytest.mark.parametrize("fast_path", [True, False])
def test_fast_path_switch_decides_whether_pynetdicom_is_patched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    """[dicom] fast_path = false leaves pynetdicom as shipped: its time module and the
    DUL's 1 ms poll; an echo still works either way."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from triaged.config import DicomSettings
    from triaged.dicom.scp import DUL_POLL_SECONDS, StoreSCP
    from triaged.dicom.spool import Spool
    from triaged.worklist import db

    monkeypatch.setattr(pa, "time", time)  # as if no earlier test had installed the proxy
    engine = db.make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    db.upgrade(engine)
    scp = StoreSCP(DicomSettings(port=0, fast_path=fast_path), Spool(tmp_path / "spool", 1), engine)
    scp.start()
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="TRIAGED")
        assert assoc.is_established
        assert scp._server is not None
        delays = {a.dul._run_loop_delay for a in scp._server.active_associations}
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        scp.shutdown()
        engine.dispose()
    assert delays == ({DUL_POLL_SECONDS} if fast_path else {0.001})
    assert isinstance(pa.time, reactor._ReactorClock) is fast_path
