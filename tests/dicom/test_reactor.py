"""The reactor wake-up proxy routes only the acceptor's 1 ms nap to the DIMSE queue."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

import pynetdicom.association as pa

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
