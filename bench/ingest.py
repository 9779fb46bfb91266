"""Ingest benchmark: 300 CT instances of 512x512 over one association, triaged vs storescp.

Run: ``.venv/bin/python bench/ingest.py [--instances 300] [--repeat 3]``. Both receivers get
the same files from dcmtk's storescu with TCP_NODELAY on both ends; triaged fsyncs every
instance and commits its database row before answering, storescp does neither. A third
receiver, a minimal pynetdicom SCP (chunked receive, TCP_NODELAY, 0.1 ms DUL poll, answers
Success without storing anything), shows the ceiling of the library triaged is built on.
Prints instances/s for each (median of the repeats) and the ratios. Target: ratio >= 0.3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("receiver exited early")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def send(port: int, files: Path, aec: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        ["storescu", "+sd", "-aec", aec, "127.0.0.1", str(port), str(files)],
        env=ENV,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return elapsed


def bench_storescp(files: Path, n: int, work: Path) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-od", str(out), str(port)], env=ENV)
    try:
        wait_port(port, proc)
        return n / send(port, files, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait()


def minimal_scp(port: int) -> None:
    """Serve C-STORE with pynetdicom and do nothing else: the library's own ceiling."""
    from pynetdicom import AE, _config, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    _config.STORE_RECV_CHUNKED_DATASET = True

    def on_open(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        event.assoc.dul._run_loop_delay = 0.0001

    ae = AE("MINIMAL")
    ae.maximum_pdu_size = 131072
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax)
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_CONN_OPEN, on_open)]
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


def bench_minimal(files: Path, n: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--minimal-scp", str(port)])
    try:
        wait_port(port, proc)
        return n / send(port, files, "MINIMAL")
    finally:
        proc.terminate()
        proc.wait()


def bench_triaged(files: Path, n: int, work: Path) -> float:
    port = free_port()
    cfg = work / "config.toml"
    cfg.write_text(
        f'pipelines = []\n[dicom]\nport = {port}\n[storage]\nspool_dir = "spool"\n'
        'min_free_mb = 100\n[database]\nurl = "sqlite:///worklist.db"\n'
        "[web]\nenabled = false\n[worker]\nin_process = 0\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "triaged.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        return n / send(port, files, "TRIAGED")
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--minimal-scp", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.minimal_scp:
        minimal_scp(args.minimal_scp)
        return
    from triaged.synthetic import generate_study

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        study = generate_study(root / "study", seed=1, slices=args.instances, size=512)
        files = root / "files"
        files.mkdir()
        for i, f in enumerate(study.series[0].paths):
            shutil.copy(f, files / f"{i:04d}.dcm")
        mb = sum(f.stat().st_size for f in files.iterdir()) / 1e6
        print(
            f"generated {args.instances} CT instances 512x512 ({mb:.0f} MB) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        scp, tri, low = [], [], []
        for r in range(args.repeat):
            work = root / f"run{r}"
            (work / "a").mkdir(parents=True)
            (work / "b").mkdir()
            scp.append(bench_storescp(files, args.instances, work / "a"))
            tri.append(bench_triaged(files, args.instances, work / "b"))
            low.append(bench_minimal(files, args.instances))
            print(
                f"run {r + 1}: storescp {scp[-1]:.0f}/s, triaged {tri[-1]:.0f}/s, "
                f"minimal pynetdicom {low[-1]:.0f}/s"
            )
        s, t, m = statistics.median(scp), statistics.median(tri), statistics.median(low)
        print(
            f"median: dcmtk storescp {s:.0f} instances/s, triaged serve {t:.0f} instances/s "
            f"(fsync + database row per instance), ratio {t / s:.2f} (target >= 0.30); "
            f"minimal pynetdicom SCP (stores nothing) {m:.0f} instances/s, ratio {m / s:.2f}"
        )


if __name__ == "__main__":
    main()
