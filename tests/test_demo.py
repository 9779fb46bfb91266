"""`triaged demo` end to end in its reduced mode: train, serve, push, score, deliver, reorder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def run_demo(workdir: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "triaged.cli",
            "demo",
            "--quick",
            "--workdir",
            str(workdir),
            "--no-keep-running",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return out, time.monotonic() - t0


def test_demo_puts_positive_studies_first_and_second_run_reuses_the_model(tmp_path) -> None:
    work = tmp_path / "demo"
    first, t_first = run_demo(work)
    text = first.stdout + first.stderr
    assert first.returncode == 0, text[-4000:]
    assert "OK: 2/2 studies with lesions lead the worklist" in first.stdout
    rows = [
        line.split()
        for line in first.stdout.splitlines()
        if "DELIVERED" in line and "SYNTH-" in line
    ]
    truth = [r[r.index("DELIVERED") + 2] for r in rows]
    assert truth == ["lesions", "lesions", "clear", "clear"], first.stdout
    received = list((work / "pacs").rglob("*.dcm"))
    assert {p.name.split("_")[0] for p in received} >= {"SR", "OT"} or len(received) >= 8
    assert (work / "models" / "fusion" / "live.json").is_file()
    assert "SYNTHETIC" in text
    second, t_second = run_demo(work)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    # v1 is the trained model, v2 the same weights with the study decision fitted by the demo
    assert "reusing fusion:v2" in second.stderr
    assert "reusing the study decision of fusion:v2" in second.stderr
    assert t_second < t_first
