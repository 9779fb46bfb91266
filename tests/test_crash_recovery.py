"""kill -9 of a real `triaged serve` while it scores and while it delivers, then a restart:
each study is scored once and each result object reaches the PACS (a dcmtk storescp) once.

DICOM has no transaction across a connection drop: an object the PACS had received when
the sender died unanswered is sent again after the restart. It carries the same SOP
Instance UID, so the PACS stores it once; the tests therefore count objects by SOP
Instance UID and bound the re-sends to the one store that can be in flight.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests import test_delivery_hardening, test_scoring_e2e
from tests.conftest import Daemon, storescu
from tests.test_delivery_hardening import Peer
from tests.test_scoring_e2e import scoring_daemon
from triaged.synthetic import generate_study

# the fixtures of those modules, shared here: a PACS peer, the tiny models, their pipeline
peers = test_delivery_hardening.peers
model_store = test_scoring_e2e.model_store
pipeline_file = test_scoring_e2e.pipeline_file

SLEEP_AFTER_STORE = 4  # seconds the paused PACS waits after answering each store


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql))]
    finally:
        eng.dispose()


def wait_for(url: str, sql: str, what: str, timeout: float = 120) -> list[tuple[Any, ...]]:
    """Poll the database (not the CLI: the moment to catch may be short) until rows appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = query(url, sql)
        if rows:
            return rows
        time.sleep(0.05)
    raise TimeoutError(f"never saw {what}")


def current_uids(url: str) -> set[str]:
    rows = query(
        url,
        "SELECT d.sop_instance_uid FROM deliveries d JOIN results r ON r.id = d.result_id "
        "WHERE r.superseded = false",
    )
    return {str(u) for (u,) in rows}


def assert_one_result_delivered(d: Daemon, peer: Peer) -> Counter[str]:
    """One result row, every current delivery DELIVERED; the PACS's objects by SOP UID."""
    assert query(d.db_url, "SELECT count(*) FROM results") == [(1,)]
    states = query(d.db_url, "SELECT state, count(*) FROM deliveries GROUP BY state")
    expected = current_uids(d.db_url)
    assert states == [("DELIVERED", len(expected))] and len(expected) >= 2, states
    received = Counter(peer.uids())
    assert set(received) == expected, (received, expected)  # no object with a new UID
    return received


@pytest.mark.usefixtures("model_store")
def test_kill_while_scoring_scores_once_and_delivers_once(
    make_daemon: Any, peers: Any, pipeline_file: Path, db_url: str, tmp_path: Path
) -> None:
    peer = peers()
    study = generate_study(tmp_path / "s", seed=81, positive=True, slices=40, size=128)
    d = scoring_daemon(make_daemon, pipeline_file, peer.port, db_url).start()
    assert storescu(d.port, *study.files).returncode == 0
    wait_for(d.db_url, "SELECT id FROM studies WHERE state = 'SCORING'", "a study SCORING")
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)  # freeze it, check where it is, then kill it there
    assert query(d.db_url, "SELECT state FROM studies") == [("SCORING",)]
    assert query(d.db_url, "SELECT count(*) FROM results") == [(0,)]
    d.kill()

    d.start()
    d.wait_state("DELIVERED", timeout=240)
    assert "1 job(s) of a dead worker on this host queued again" in d.log()
    assert query(d.db_url, "SELECT state, attempts FROM jobs") == [("DONE", 2)]
    received = assert_one_result_delivered(d, peer)
    assert set(received.values()) == {1}, received


@pytest.mark.usefixtures("model_store")
def test_kill_while_delivering_resends_only_what_was_not_confirmed(
    make_daemon: Any, peers: Any, pipeline_file: Path, db_url: str, tmp_path: Path
) -> None:
    # the PACS answers each store, then sleeps: the next store is in flight meanwhile
    peer = peers(("--sleep-after", str(SLEEP_AFTER_STORE)))
    study = generate_study(tmp_path / "s", seed=82, positive=True, slices=16, size=64)
    d = scoring_daemon(make_daemon, pipeline_file, peer.port, db_url).start()
    assert storescu(d.port, *study.files).returncode == 0
    wait_for(
        d.db_url,
        "SELECT 1 FROM deliveries a, deliveries b WHERE a.state = 'DELIVERED' "
        "AND b.state = 'PENDING' AND b.lease_owner IS NOT NULL",
        "one object confirmed while the others are claimed",
    )
    os.kill(peer.pid, signal.SIGSTOP)  # the PACS hangs with a store in flight
    done = query(d.db_url, "SELECT sop_instance_uid FROM deliveries WHERE state = 'DELIVERED'")
    confirmed = {str(u) for (u,) in done}
    assert query(d.db_url, "SELECT count(*) FROM deliveries WHERE state = 'PENDING'") != [(0,)]
    d.kill()
    os.kill(peer.pid, signal.SIGCONT)

    d.start()
    d.wait_state("DELIVERED", timeout=90)  # well before the dead process's claims expire
    assert "delivery claim(s) of a dead process on this host due again" in d.log()
    received = assert_one_result_delivered(d, peer)
    assert all(received[u] == 1 for u in confirmed), (received, confirmed)
    # only the one store in flight at the kill may have reached the PACS twice (same UID)
    assert sum(received.values()) <= len(received) + 1, received
    attempts = query(
        d.db_url, "SELECT sop_instance_uid, attempts FROM deliveries WHERE state = 'DELIVERED'"
    )
    assert all(a == 1 for u, a in attempts if u in confirmed), attempts
