"""Write a validation report: ``validation.json``, ``validation.md`` and its PNG plots.

Every file is written to a temporary name in the output folder and renamed into place, so a
reader (or a crash) never sees half a report. The Markdown names no patient: the patient
column is only in ``validation.json``, which keeps it for re-analysis.
matplotlib is imported here only, never by the daemon.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from triaged.training import metrics as M

ROC_PNG = "roc.png"
RELIABILITY_PNG = "reliability.png"


def _atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _scored(report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in report["studies"] if r["state"] == "SCORED"]
    return (
        np.asarray([r["label"] for r in rows], dtype=np.int64),
        np.asarray([r["probability"] for r in rows], dtype=np.float64),
    )


def _fmt(est: dict[str, Any]) -> str:
    v, (lo, hi) = est["value"], est["ci"]
    if v is None:
        return "undefined"
    ci = "" if lo is None else f" ({lo:.3f} to {hi:.3f})"
    return f"{v:.3f}{ci}"


def _plots(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p = _scored(report)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    if y.size and 0 < y.sum() < y.size:
        fpr, tpr, _ = M.roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {_fmt(report['metrics']['auc'])}")
        for pt in report["metrics"]["operating_points"]:
            if pt["kind"] == "level":
                sens, spec = pt["sensitivity"]["value"], pt["specificity"]["value"]
                if sens is not None and spec is not None:
                    ax.plot(1 - spec, sens, "o", label=f"priority {pt['priority']}")
    else:
        ax.text(0.5, 0.5, "needs positive and negative studies", ha="center")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title="ROC (COVID-19 positive)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _atomic(out / ROC_PNG, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)

    bins = report["metrics"]["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    full = [b for b in bins if b["count"]]
    ax.bar(
        [b["low"] for b in full],
        [b["observed"] for b in full],
        width=0.1,
        align="edge",
        edgecolor="black",
        alpha=0.6,
        label="observed fraction positive",
    )
    ax.plot(
        [b["mean_probability"] for b in full],
        [b["observed"] for b in full],
        "o-",
        color="C1",
        label="bin mean probability",
    )
    for b in full:
        ax.annotate(
            str(b["count"]), (b["low"] + 0.05, b["observed"]), ha="center", va="bottom", fontsize=7
        )
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set(
        xlabel="predicted probability (fusion, study)",
        ylabel="observed fraction COVID-19",
        title=f"Reliability, ECE {_fmt(report['metrics']['ece'])}",
        xlim=(0, 1),
        ylim=(0, 1.05),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _atomic(out / RELIABILITY_PNG, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    """The readable report (no patient identifiers)."""
    c, m, b = report["counts"], report["metrics"], report["bootstrap"]
    models = (
        ", ".join(
            f"{x['role']} `{x['ref']}` (weights sha256 {str(x['weights_sha256'])[:12]})"
            for x in report["models"]
        )
        or "none loaded"
    )
    lines = [
        "# Study-level validation",
        "",
        f"Pipeline `{report['pipeline']['ref']}`; models: {models}; triaged "
        f"{report['triaged_version']}; {report['created']}.",
        "Each study was scored by the daemon's own scoring path (series selection, "
        "preparation, models, aggregation, priority). NOT FOR DIAGNOSTIC USE.",
        "",
        f"**{c['studies']} studies** in the labels file: {c['scored']} scored, "
        f"{c['skipped']} skipped, {c['failed']} failed. Metrics use the {c['scored']} scored "
        f"studies of {c['patients']} patients ({c['positives']} positive, "
        f"{c['negatives']} negative); skipped and failed studies are excluded.",
        "",
        f"Intervals: {b['level']:.0%} percentile intervals from a patient-level bootstrap "
        f"({b['resamples']} resamples of patients with replacement, all studies of a drawn "
        f"patient, seed {b['seed']}).",
        "",
        "| figure | value (95% CI) |",
        "|---|---|",
        f"| AUC | {_fmt(m['auc'])} |",
        f"| ECE ({m['ece']['bins']} equal-width bins) | {_fmt(m['ece'])} |",
        "",
        "| operating point | sensitivity (95% CI) | specificity (95% CI) | TP | FP | TN | FN |",
        "|---|---|---|---|---|---|---|",
    ]
    for pt in m["operating_points"]:
        lines.append(
            f"| {pt['name']} | {_fmt(pt['sensitivity'])} | {_fmt(pt['specificity'])} "
            f"| {pt['tp']} | {pt['fp']} | {pt['tn']} | {pt['fn']} |"
        )
    lines += [
        "",
        "A study reaches a priority level when its fusion probability is at least the "
        "level's threshold: the fitted operating point of the model card when it has a "
        "study decision (the probability is then the calibrated one), else the level's "
        "`min_probability` (before the requested-priority bonus of the order). `flag` is the "
        "daemon's own flag of each study.",
        "",
        "ECE = sum over bins of (studies in bin / all studies) x |fraction positive in bin "
        "- mean probability in bin|; bin b holds b/10 <= p < (b+1)/10 (p = 1 in the last).",
        "",
        f"![ROC curve]({ROC_PNG})",
        f"![Reliability diagram]({RELIABILITY_PNG})",
        "",
    ]
    left_out = [r for r in report["studies"] if r["state"] != "SCORED"]
    if left_out:
        lines += [
            "## Not scored (excluded from the metrics)",
            "",
            "| study | state | reason |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['study']} | {r['state']} | {r['reason'].replace('|', '/')} |" for r in left_out
        ]
        lines.append("")
    if len(report["models_seen"]) > len(report["models"]):
        lines += [
            "**Warning**: the live model changed during the run; studies were scored "
            f"by {', '.join(report['models_seen'])} (see `validation.json`).",
            "",
        ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Plots first, then ``validation.json``, then ``validation.md`` (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    _plots(report, out)
    json_path, md_path = out / "validation.json", out / "validation.md"
    text = json.dumps(report, indent=1, allow_nan=False)
    _atomic(json_path, lambda fh: fh.write(text.encode()))
    _atomic(md_path, lambda fh: fh.write(markdown(report).encode()))
    return json_path, md_path
