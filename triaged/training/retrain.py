"""``retrain(options)``: train what was asked, register new versions, promote when better.

One entry point for the CLI (``triaged retrain``), the scheduler and the tests. A run lives
in ``run_dir`` (config.json, train.log, one folder per phase with per-epoch checkpoints);
running the same options with the same ``run_dir`` again resumes where it stopped.

Data specs (``--data``, repeatable): ``covid-ct:PATH``, ``semiseg:PATH``, ``medseg:PATH``,
``manifest:CSV`` (an admin's DICOM manifest), ``labels:EXPORT`` (the worklist's
``triaged-labels/1`` export), ``synthetic:N`` (phantom slices, for the demo and tests).
Classification data trains the fusion and CNN models, segmentation data Inf-Net. Test
splits are never used for training or selection; with ``report_test`` they are scored once
at the end and written to the card under ``metrics.test``.

Stages: ``infnet`` (Algorithm 1), ``1``, ``2``, ``3`` (Algorithm 2), ``cbam`` and ``plain``
(Rao et al.'s CNN with/without CBAM). Registered names: ``infnet``, ``fusion``,
``cbam-cnn``, ``plain-cnn``. ``promote`` makes a new version live only if its validation
figure (AUC; Dice for Inf-Net) is at least that of the live version on the same slices.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from triaged.pipeline import ood
from triaged.pipeline.builders import load_version
from triaged.pipeline.ood import OodError, register_with_fit
from triaged.pipeline.preprocess import Preprocessing
from triaged.registry import (
    Architecture,
    ModelCard,
    ModelStore,
    ModelVersion,
    RegistryError,
    TrainingData,
)
from triaged.training import metrics as M
from triaged.training.baseline import BaselineSettings, train_baseline
from triaged.training.datasets import (
    Sample,
    SliceDataset,
    covid_ct,
    covid_semiseg,
    medseg_png,
    synthetic,
)
from triaged.training.dicom_data import dicom_manifest, worklist_labels
from triaged.training.loop import (
    Runtime,
    attach_log,
    log,
    read_json,
    seed_everything,
    setup_runtime,
    write_json,
)
from triaged.training.ood_fit import DEFAULT_MAX_SHARE, DEFAULT_QUANTILE, fit_on_samples
from triaged.training.semi import SemiSettings, mean_dice, split_labelled, train_semi
from triaged.training.staged import FusionSettings, build_fusion, collect, run_stage

if TYPE_CHECKING:
    from triaged.nets.fusion import FusionNet

STAGES = ("infnet", "1", "2", "3", "cbam", "plain")
DATA_KINDS = ("covid-ct", "semiseg", "medseg", "manifest", "labels", "synthetic")


class RetrainError(ValueError):
    """A retrain request that cannot run (bad option, missing data): one line for the user."""


class RetrainOptions(BaseModel):
    """Everything ``retrain`` needs; also the schema of ``--config`` files (TOML or JSON)."""

    model_config = ConfigDict(extra="forbid")

    data: list[str] = Field(min_length=1)
    stages: list[str] = Field(default_factory=lambda: ["1", "2", "3"])
    backbone: str = "efficientnet-lite0"
    init: str = "imagenet"
    seed: int = 0
    fusion: dict[str, Any] = Field(default_factory=dict)
    semi: dict[str, Any] = Field(default_factory=dict)
    baseline: dict[str, Any] = Field(default_factory=dict)
    store: Path = Path("models")
    run_dir: Path | None = None
    start_from: str | None = None
    infnet_from: str | None = None
    promote: bool = False
    report_test: bool = False
    slices_per_study: int = Field(default=16, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int = Field(default=0, ge=0)
    progress: bool = True

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STAGES]
        if bad or not v:
            raise ValueError(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
        return [s for s in STAGES if s in v]  # canonical order

    @field_validator("data")
    @classmethod
    def _data(cls, v: list[str]) -> list[str]:
        for spec in v:
            kind = spec.split(":", 1)[0]
            if kind not in DATA_KINDS or ":" not in spec:
                raise ValueError(
                    f"data {spec!r}: expected KIND:PATH with KIND in {', '.join(DATA_KINDS)}"
                )
        return v

    def fusion_settings(self) -> FusionSettings:
        return _settings(
            FusionSettings,
            {"backbone": self.backbone, "init": self.init, "seed": self.seed, **self.fusion},
            "fusion",
        )

    def semi_settings(self) -> SemiSettings:
        extra = dict(self.semi)
        if "scales" in extra:
            extra["scales"] = tuple(extra["scales"])
        return _settings(SemiSettings, {"seed": self.seed, **extra}, "semi")

    def baseline_settings(self, cbam: bool) -> BaselineSettings:
        return _settings(
            BaselineSettings, {"seed": self.seed, **self.baseline, "cbam": cbam}, "baseline"
        )


def _settings(cls: Any, values: dict[str, Any], section: str) -> Any:
    try:
        return replace(cls(), **values)
    except TypeError as exc:
        raise RetrainError(f"[{section}]: {exc}") from exc


@dataclass
class DataBundle:
    """Classification and segmentation samples gathered from every data spec."""

    cls: dict[str, list[Sample]] = field(
        default_factory=lambda: {"train": [], "val": [], "test": []}
    )
    seg_labelled: list[Sample] = field(default_factory=list)
    seg_unlabelled: list[Sample] = field(default_factory=list)
    seg_test: list[Sample] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def gather_data(opts: RetrainOptions, run_dir: Path) -> DataBundle:
    b = DataBundle(sources=list(opts.data))
    for spec in opts.data:
        kind, arg = spec.split(":", 1)
        path = Path(arg)
        if kind not in ("synthetic",) and not path.exists():
            raise RetrainError(f"data {spec!r}: {path} does not exist")
        if kind == "covid-ct":
            _extend(b.cls, covid_ct(path))
        elif kind == "manifest":
            _extend(b.cls, dicom_manifest(path, opts.slices_per_study))
        elif kind == "labels":
            _extend(b.cls, worklist_labels(path, opts.slices_per_study))
        elif kind == "semiseg":
            semi = covid_semiseg(path)
            b.seg_labelled += semi.labelled
            b.seg_unlabelled += semi.unlabelled
            b.seg_test += semi.test
        elif kind == "medseg":
            b.seg_labelled += [s for s in medseg_png(path) if s.split != "test"]
        elif kind == "synthetic":
            try:
                n = int(arg)
            except ValueError as exc:
                raise RetrainError(f"data {spec!r}: synthetic:N needs a count") from exc
            size = max(64, opts.fusion_settings().input_size)
            data = synthetic(run_dir / "synthetic", n, size=size, seed=opts.seed)
            _extend(b.cls, data)
            with_lesion = [s for s in data["train"] if s.label == 1]
            half = max(2, len(with_lesion) // 2)
            b.seg_labelled += with_lesion[:half]
            b.seg_unlabelled += [
                replace(s, mask=None, mask_lut=None, label=None)
                for s in data["train"]
                if s not in with_lesion[:half]
            ]
    return b


def _extend(into: dict[str, list[Sample]], more: dict[str, list[Sample]]) -> None:
    for k, v in more.items():
        into.setdefault(k, []).extend(v)


@dataclass(frozen=True)
class RetrainResult:
    run_dir: Path
    versions: list[ModelVersion]
    promoted: dict[str, bool]
    messages: list[str]


def _cls_score(
    model: nn.Module, arch: str, samples: Sequence[Sample], prep: Preprocessing, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(COVID) of a classifier (fusion head or CNN) over ``samples``."""
    from torch.utils.data import DataLoader

    from triaged.nets.cbam import prob_covid

    labels, probs = [], []
    model.eval()
    with torch.no_grad():
        for b in DataLoader(SliceDataset(samples, prep), batch_size=batch, shuffle=False):
            out = model(b["image"])
            p = out.p_fusion if arch == "fusion" else prob_covid(out)
            probs.append(p.float().numpy())
            labels.append(b["label"].numpy())
    return np.concatenate(labels).astype(int), np.concatenate(probs)


def _figure(
    mv_or_model: ModelVersion | nn.Module, samples: Sequence[Sample], card: ModelCard
) -> float:
    """The promotion figure of a model on ``samples``: AUC (classifiers) or Dice (Inf-Net)."""
    model = load_version(mv_or_model) if isinstance(mv_or_model, ModelVersion) else mv_or_model
    prep = Preprocessing.from_card(card.preprocessing)
    arch = card.architecture.name
    if arch == "infnet":
        from triaged.training.loop import Runtime

        return mean_dice(
            model,  # type: ignore[arg-type]
            SliceDataset(samples, prep, with_mask=True),
            Runtime(torch.device("cpu"), "fp32"),
            8,
        )
    labels, probs = _cls_score(model, arch, samples, prep, 16)
    value = M.auc(labels, probs)
    return M.accuracy(labels, M.predictions(probs)) if math.isnan(value) else value


def evaluate_model(
    model: nn.Module, arch: str, samples: Sequence[Sample], prep: Preprocessing, seed: int = 0
) -> dict[str, Any]:
    """Figures of a model on labelled slices: Dice (mean over slices) for Inf-Net, else the
    full classification report (accuracy, F1, AUC with bootstrap intervals...)."""
    if arch == "infnet":
        from triaged.training.loop import Runtime

        ds = SliceDataset(samples, prep, with_mask=True)
        return {
            "n": len(samples),
            "dice": mean_dice(
                model,  # type: ignore[arg-type]
                ds,
                Runtime(torch.device("cpu"), "fp32"),
                8,
            ),
        }
    labels, probs = _cls_score(model, arch, samples, prep, 16)
    return M.report(labels, probs, seed=seed).as_dict()


def evaluate_version(
    mv: ModelVersion,
    samples: Sequence[Sample],
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate_model` of a registered version, fed as its card says."""
    return evaluate_model(
        load_version(mv),
        mv.card.architecture.name,
        samples,
        Preprocessing.from_card(mv.card.preprocessing),
        seed,
    )


def _promote(
    store: ModelStore, mv: ModelVersion, model: nn.Module, val: Sequence[Sample]
) -> tuple[bool, str]:
    live = store.live(mv.name)
    metric = "Dice" if mv.card.architecture.name == "infnet" else "AUC"
    new = _figure(model, val, mv.card)
    if live is None:
        store.promote(mv.name, mv.version, reason=f"first live version; val {metric} {new:.4f}")
        return True, f"{mv.ref} promoted (no live version before; val {metric} {new:.4f})"
    old = _figure(live, val, live.card)
    if new >= old or math.isnan(old):
        store.promote(
            mv.name, mv.version, reason=f"val {metric} {new:.4f} >= live {live.ref} {old:.4f}"
        )
        return True, f"{mv.ref} promoted: val {metric} {new:.4f} >= {old:.4f} of {live.ref}"
    return False, (
        f"{mv.ref} NOT promoted: val {metric} {new:.4f} < {old:.4f} of live "
        f"{live.ref} on the same {len(val)} validation slices"
    )


def _card(
    arch: Architecture,
    data: DataBundle,
    split: str,
    counts: dict[str, int],
    metrics: dict[str, Any],
    training: dict[str, Any],
    prep: Preprocessing,
    seed: int,
    notes: str = "",
) -> ModelCard:
    return ModelCard(
        architecture=arch,
        data=TrainingData(sources=data.sources, split=split, counts=counts),
        metrics=metrics,
        training=training,
        preprocessing=prep.as_card(),
        seed=seed,
        notes=notes,
    )


def _prepare_run_dir(opts: RetrainOptions) -> Path:
    run_dir = opts.run_dir or Path("runs") / datetime.now(UTC).strftime("retrain-%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = opts.model_dump(mode="json", exclude={"promote", "progress", "threads", "run_dir"})
    cfg_file = run_dir / "config.json"
    if int(os.environ.get("RANK", "0")) != 0:
        return run_dir  # rank 0 checks and writes the config
    if cfg_file.exists():
        old = read_json(cfg_file)
        if old != cfg:
            diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            raise RetrainError(
                f"{run_dir} holds a run with other options ({', '.join(diff)}); "
                "use a new --run-dir or the same options to resume"
            )
    else:
        write_json(cfg_file, cfg)
    return run_dir


def training_threads(requested: int) -> int:
    """Torch threads for a training run; 0 means all usable cores but one.

    Retraining usually runs beside ``serve`` (the scheduled job, or an admin on the same
    box). When torch's threads outnumber the free cores, every parallel region waits for a
    descheduled thread: on the 2-core build machine an Inf-Net epoch went from 1.8 s to
    about 110 s while one other core was busy. Leaving one core free avoids that.
    """
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def retrain(opts: RetrainOptions) -> RetrainResult:
    """Run the requested stages; register each trained model; promote if asked and better."""
    torch.set_num_threads(training_threads(opts.threads))
    run_dir = _prepare_run_dir(opts)
    handler = attach_log(run_dir)
    try:
        return _retrain(opts, run_dir)
    finally:
        log.removeHandler(handler)
        handler.close()


CLS_SPLIT = (
    "validation split of the data sources (COVID-CT: official Data-split; DICOM: "
    "split column or stable hash of the study)"
)


@dataclass
class _Run:
    """One retrain run: its options, data and runtime, and what it registered so far."""

    opts: RetrainOptions
    run_dir: Path
    rt: Runtime
    store: ModelStore
    data: DataBundle
    versions: list[ModelVersion] = field(default_factory=list)
    promoted: dict[str, bool] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def cls_counts(self) -> dict[str, int]:
        return {"train": len(self.data.cls["train"]), "val": len(self.data.cls["val"])}

    def register(
        self,
        name: str,
        model: nn.Module,
        card: ModelCard,
        val_set: Sequence[Sample],
        files: dict[str, bytes] | None = None,
    ) -> None:
        """Store the model (rank 0 only) and, when asked, promote it if it is better."""
        if not self.rt.is_main:
            return
        model.to("cpu")
        mv = self.store.register(name, model.state_dict(), card, files=files)
        self.versions.append(mv)
        self.messages.append(f"registered {mv.ref} ({_brief(card.metrics)})")
        log.info("registered %s at %s", mv.ref, mv.path)
        if self.opts.promote:
            ok, why = _promote(self.store, mv, model, val_set)
            self.promoted[name] = ok
            self.messages.append(why)
            log.info(why)


def _retrain(opts: RetrainOptions, run_dir: Path) -> RetrainResult:
    rt = setup_runtime(opts.precision)
    seed_everything(opts.seed)  # model initialisation is part of the run's seed
    run = _Run(opts, run_dir, rt, ModelStore(opts.store), gather_data(opts, run_dir))
    data = run.data
    train, val, test = data.cls["train"], data.cls["val"], data.cls["test"]
    log.info(
        "retrain in %s: stages %s; %d/%d/%d classification slices, %d+%d segmentation, %s %s on %s",
        run_dir,
        ",".join(opts.stages),
        len(train),
        len(val),
        len(test),
        len(data.seg_labelled),
        len(data.seg_unlabelled),
        rt.device,
        rt.precision,
        f"rank {rt.rank}/{rt.world_size}",
    )
    need_cls = [s for s in opts.stages if s != "infnet"]
    if need_cls and (not train or not val):
        raise RetrainError(
            f"stages {','.join(need_cls)} need labelled classification data "
            "with train and val slices (covid-ct:, manifest:, labels:, synthetic:)"
        )

    infnet_state: dict[str, torch.Tensor] | None = None
    if "infnet" in opts.stages:
        infnet_state = _infnet_stage(run)
    elif opts.infnet_from:
        infnet_state = load_version(run.store.resolve(opts.infnet_from)).state_dict()
    fusion_stages = [int(s) for s in opts.stages if s in ("1", "2", "3")]
    if fusion_stages:
        _fusion_stages(run, fusion_stages, infnet_state)
    for variant in ("cbam", "plain"):
        if variant in opts.stages:
            _cnn_stage(run, variant)

    write_json(
        run_dir / "result.json",
        {
            "versions": [v.ref for v in run.versions],
            "promoted": run.promoted,
            "messages": run.messages,
        },
    )
    return RetrainResult(run_dir, run.versions, run.promoted, run.messages)


def _infnet_stage(run: _Run) -> dict[str, torch.Tensor]:
    """Algorithm 1 (semi-supervised Inf-Net); registers ``infnet``, returns its weights."""
    data, opts = run.data, run.opts
    if not data.seg_labelled:
        raise RetrainError("stage infnet needs segmentation data (semiseg:, medseg:, synthetic:)")
    s = opts.semi_settings()
    seed_everything(s.seed)
    res = train_semi(
        data.seg_labelled,
        data.seg_unlabelled,
        s,
        run.run_dir / "infnet",
        run.rt,
        progress=opts.progress,
    )
    state = res.model.state_dict()
    val_seg = split_labelled(data.seg_labelled, s.val_fraction)[1]
    prep = Preprocessing(size=s.input_size)
    metrics: dict[str, Any] = {"dice": res.val_dice, "rounds": [r.best for r in res.rounds]}
    if opts.report_test and data.seg_test:
        metrics["test"] = evaluate_model(res.model.cpu(), "infnet", data.seg_test, prep)
    card = _card(
        Architecture(name="infnet", params={"channel": s.channel, "input_size": s.input_size}),
        data,
        f"doctor-labelled slices, {s.val_fraction:.0%} held out by a stable "
        "hash for validation; unlabelled pool pseudo-labelled in rounds",
        {"labelled": res.n_labelled, "pseudo": res.n_pseudo, "val": res.n_val},
        metrics,
        s.as_card(),
        prep,
        s.seed,
    )
    run.register("infnet", res.model, card, val_seg)
    return state


def _fusion_start(
    run: _Run,
    fusion_stages: list[int],
    infnet_state: dict[str, torch.Tensor] | None,
) -> tuple[FusionNet, FusionSettings, str]:
    """The fusion model the stages start from (``--start-from`` or new) with its Inf-Net."""
    opts, store = run.opts, run.store
    fs = opts.fusion_settings()
    if opts.start_from:
        start = store.resolve(opts.start_from)
        if start.card.architecture.name != "fusion":
            raise RetrainError(f"--start-from {start.ref} is not a fusion model")
        model = cast("FusionNet", load_version(start))
        fs = replace(fs, input_size=int(start.card.preprocessing.get("size", fs.input_size)))
        init_desc = f"from {start.ref}"
    else:
        seed_everything(fs.seed)
        model, init_desc = build_fusion(fs)
    if infnet_state is not None:
        model.infnet.load_state_dict(infnet_state)
    elif 2 in fusion_stages and not opts.start_from:
        live_inf = store.live("infnet")
        if live_inf is None:
            raise RetrainError(
                "stage 2 needs an Inf-Net: add stage infnet, pass "
                "--infnet-from NAME:VERSION, or promote an infnet version"
            )
        model.infnet.load_state_dict(load_version(live_inf).state_dict())
        init_desc += f"; Inf-Net {live_inf.ref}"
    return model, fs, init_desc


def _fusion_stages(
    run: _Run, fusion_stages: list[int], infnet_state: dict[str, torch.Tensor] | None
) -> None:
    """Algorithm 2 (staged fusion training); registers ``fusion``."""
    opts, data = run.opts, run.data
    train, val, test = data.cls["train"], data.cls["val"], data.cls["test"]
    model, fs, init_desc = _fusion_start(run, fusion_stages, infnet_state)
    results = {}
    for st in fusion_stages:
        results[f"stage{st}"] = run_stage(
            st, model, train, val, fs, run.run_dir / f"stage{st}", run.rt, opts.progress
        )
    prep = Preprocessing(size=fs.input_size)
    model.to("cpu")
    labels, probs = collect(
        model,
        SliceDataset(val, prep),
        ["global", "heatmap", "infected", "fusion"],
        setup_runtime("fp32", "cpu"),
        fs.batch_size,
    )
    report = M.report(labels, probs["fusion"], seed=opts.seed)
    metrics: dict[str, Any] = {
        "val": report.as_dict(),
        "auc_branches": {h: M.auc(labels, p) for h, p in probs.items()},
        "stages": {k: r.best for k, r in results.items()},
    }
    if opts.report_test and test:
        tl, tp = collect(
            model, SliceDataset(test, prep), ["fusion"], setup_runtime("fp32", "cpu"), fs.batch_size
        )
        metrics["test"] = M.report(tl, tp["fusion"], seed=opts.seed).as_dict()
    card = _card(
        Architecture(name="fusion", params=_config(model)),
        data,
        CLS_SPLIT,
        run.cls_counts,
        metrics,
        {**fs.as_card(), "init": init_desc, "stages_run": fusion_stages},
        prep,
        fs.seed,
    )
    card, files = _with_ood_fit(run, card, train, prep)
    run.register("fusion", model, card, val, files)


def _with_ood_fit(
    run: _Run,
    card: ModelCard,
    train: Sequence[Sample],
    prep: Preprocessing,
) -> tuple[ModelCard, dict[str, bytes] | None]:
    """The card and files of the fusion version plus its OOD fit on the training slices
    (``triaged.pipeline.ood``); without it when the fit cannot be made (too few slices)."""
    if not run.rt.is_main:
        return card, None
    try:
        fitted = fit_on_samples(train, prep, seed=run.opts.seed)
    except OodError as exc:
        log.warning("no OOD fit for the fusion model: %s", exc)
        run.messages.append(f"no OOD fit: {exc}")
        return card, None
    content = ood.to_bytes(fitted)
    return ood.card_with_fit(card, fitted, content, run.data.sources), {ood.OOD_FILE: content}


def _cnn_stage(run: _Run, variant: str) -> None:
    """Rao et al.'s CNN, with (``cbam``) or without (``plain``) CBAM; registers it."""
    opts, data = run.opts, run.data
    train, val, test = data.cls["train"], data.cls["val"], data.cls["test"]
    bs = opts.baseline_settings(cbam=variant == "cbam")
    seed_everything(bs.seed)
    cnn, cnn_res = train_baseline(train, val, bs, run.run_dir / variant, run.rt, opts.progress)
    cnn.to("cpu")
    prep = Preprocessing(size=bs.size)
    cnn_labels, cnn_probs = _cls_score(cnn, "baseline-cnn", val, prep, bs.batch_size)
    metrics = {
        "val": M.report(cnn_labels, cnn_probs, seed=opts.seed).as_dict(),
        "history": cnn_res.history,
    }
    if opts.report_test and test:
        test_labels, test_probs = _cls_score(cnn, "baseline-cnn", test, prep, bs.batch_size)
        metrics["test"] = M.report(test_labels, test_probs, seed=opts.seed).as_dict()
    card = _card(
        Architecture(name="baseline-cnn", params={"cbam": bs.cbam, "size": bs.size}),
        data,
        CLS_SPLIT,
        run.cls_counts,
        metrics,
        bs.as_card(),
        prep,
        bs.seed,
    )
    run.register(f"{variant}-cnn", cnn, card, val)


def _config(model: nn.Module) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cast("FusionNet", model).config)


def _brief(metrics: dict[str, Any]) -> str:
    val = metrics.get("val")
    if isinstance(val, dict):
        return (
            f"val AUC {val['auc']:.3f} acc {val['accuracy']:.3f} F1 {val['f1']:.3f} "
            f"on {val['n']} slices"
        )
    if "dice" in metrics:
        return f"val Dice {metrics['dice']:.3f}"
    return "no metrics"


def read_options_file(path: Path) -> dict[str, Any]:
    """Raw options from a TOML/JSON file (optionally under a ``[retrain]`` table)."""
    import json
    import tomllib

    try:
        raw = (
            tomllib.loads(path.read_text(encoding="utf-8"))
            if path.suffix == ".toml"
            else json.loads(path.read_text(encoding="utf-8"))
        )
    except (OSError, ValueError) as exc:
        raise RetrainError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RetrainError(f"{path}: expected a table of retrain options")
    section = raw.get("retrain", raw)
    return dict(section)


def load_options(path: Path, **overrides: Any) -> RetrainOptions:
    """Options from a TOML/JSON file plus keyword overrides."""
    return RetrainOptions.model_validate({**read_options_file(path), **overrides})


__all__ = [
    "RegistryError",
    "RetrainError",
    "RetrainOptions",
    "RetrainResult",
    "evaluate_model",
    "evaluate_version",
    "load_options",
    "read_options_file",
    "retrain",
]


def fit_existing(
    store: ModelStore,
    ref: str,
    data: list[str],
    *,
    quantile: float = DEFAULT_QUANTILE,
    max_share: float = DEFAULT_MAX_SHARE,
    slices_per_study: int = 16,
) -> ModelVersion:
    """Register a new version of ``ref`` with an OOD fit on the train split of ``data``
    (``KIND:PATH`` specs as ``triaged retrain --data``). Not promoted: promote it after
    checking, like any version."""
    mv = store.resolve(ref)
    if mv.card.architecture.name != "fusion":
        raise RegistryError(
            f"{mv.ref} is a {mv.card.architecture.name!r} model; the OOD fit is for fusion models"
        )
    opts = RetrainOptions(data=data, store=store.root, slices_per_study=slices_per_study)
    with tempfile.TemporaryDirectory(prefix="triaged-ood-") as tmp:
        samples = gather_data(opts, Path(tmp)).cls["train"]
        if not samples:
            raise RegistryError("the data has no training slices to fit on")
        prep = Preprocessing.from_card(mv.card.preprocessing)
        fitted = fit_on_samples(samples, prep, quantile=quantile, max_share=max_share)
    new = register_with_fit(store, mv, fitted, data)
    log.info(
        "registered %s: %s + OOD fit on %d slices (threshold %.3g)",
        new.ref,
        mv.ref,
        fitted.slices,
        fitted.threshold,
    )
    return new
