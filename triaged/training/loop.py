"""The epoch loop every trainer shares: resumable checkpoints, seeds, devices, torchrun.

Why it is shaped like this:

- **Resume = uninterrupted.** ``last.pt`` is written (atomically) after every epoch with
  model, optimiser and scheduler state, the best-so-far weights and the history. Every
  epoch reseeds torch from ``(seed, epoch)`` and the datasets derive augmentation from
  ``(seed, epoch, index)``, so a run resumed at epoch k computes exactly what an
  uninterrupted run computes. ``done.json`` marks a finished phase, which is then skipped.
- **Best checkpoint per module.** A phase may train several modules that are selected
  independently (Algorithm 2 stage II trains the heat-map and infected branches, each kept
  at its own best validation epoch), so ``select`` maps module name -> metric key.
- **torchrun.** With ``WORLD_SIZE > 1`` each rank trains on its shard of every epoch
  (``DistributedSampler``) and gradients are averaged with ``all_reduce`` before the step;
  doing it by hand rather than with ``DistributedDataParallel`` keeps the staged models'
  partial forwards (a branch alone, cached features) valid. Rank 0 alone writes files.
- **Fast CPU mode.** On CPU, bfloat16 autocast + channels_last is about 3x faster for these
  convnets (docs of STACK.md); ``precision="fp32"`` turns it off (the tests use it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from triaged.atomic import atomic_path, write_atomic

log = logging.getLogger("triaged.training")
Precision = Literal["auto", "fp32", "bf16"]


# ----------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains (device, precision, distributed rank)."""

    device: torch.device
    precision: Literal["fp32", "bf16"]
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def setup_runtime(precision: Precision = "auto", device: str = "auto") -> Runtime:
    """Pick CUDA when present (else CPU) and join the torchrun group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if precision == "auto":
        bf16_ok = (dev.type == "cpu" and torch.backends.mkldnn.is_available()) or (
            dev.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        prec: Literal["fp32", "bf16"] = "bf16" if bf16_ok else "fp32"
    else:
        prec = precision
    return Runtime(device=dev, precision=prec, rank=rank, world_size=world)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- files
def atomic_torch_save(obj: Any, path: Path) -> None:
    """A checkpoint that is complete or absent, never torn by a crash."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def attach_log(run_dir: Path) -> logging.Handler:
    """Append this run's log lines to ``<run_dir>/train.log`` (rank 0 only) and stderr."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler: logging.Handler
    if int(os.environ.get("RANK", "0")) == 0:
        handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


# ----------------------------------------------------------------------------- the loop
LossFn = Callable[[dict[str, Any]], torch.Tensor]
EvalFn = Callable[[], dict[str, float]]


@dataclass
class Phase:
    """One resumable training phase (a stage of Algorithm 2, a round of Algorithm 1...)."""

    name: str
    model: nn.Module
    params: list[nn.Parameter]
    train_set: Dataset[dict[str, Any]]
    loss: LossFn
    evaluate: EvalFn
    optimizer: torch.optim.Optimizer
    epochs: int
    batch_size: int
    select: Mapping[str, str]
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    seed: int = 0
    grad_clip: float | None = None
    keep: Literal["best", "last"] = "best"
    before_step: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseResult:
    history: list[dict[str, Any]]
    best: dict[str, dict[str, Any]]  # module -> {"epoch", "metric", "value"}
    metrics: dict[str, float]  # validation metrics of the final (selected) weights


def _module_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """State of submodule ``name`` ("" = the whole model), detached CPU copies."""
    mod = model.get_submodule(name) if name else model
    return {k: v.detach().to("cpu").clone() for k, v in mod.state_dict().items()}


def _load_module_state(model: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> None:
    mod = model.get_submodule(name) if name else model
    mod.load_state_dict(dict(state), strict=True)


def _score(metrics: Mapping[str, float], key: str) -> float:
    v = float(metrics.get(key, float("nan")))
    if math.isnan(v) and key.startswith("auc"):  # one-class validation set: fall back
        v = float(metrics.get(key.replace("auc", "accuracy", 1), float("nan")))
    return v


def _batches(phase: Phase, rt: Runtime, epoch: int) -> Iterator[dict[str, Any]]:
    ds = phase.train_set
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
    sampler: DistributedSampler[Any] = DistributedSampler(
        ds,
        num_replicas=rt.world_size,
        rank=rt.rank,
        shuffle=True,
        seed=phase.seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=phase.batch_size, sampler=sampler, num_workers=0)
    yield from loader


def _sync_grads(params: list[nn.Parameter], rt: Runtime) -> None:
    if rt.world_size <= 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= rt.world_size


def _broadcast(model: nn.Module, rt: Runtime) -> None:
    """Start every rank from rank 0's weights (and buffers), whatever each one built."""
    if rt.world_size <= 1:
        return
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
    }


def run_phase(phase: Phase, run_dir: Path, rt: Runtime, progress: bool = True) -> PhaseResult:
    """Train ``phase`` in ``run_dir`` (resuming from ``last.pt``), keep the selected weights.

    On return the model holds the selected (best or last) weights of every module in
    ``phase.select``.
    """
    from tqdm import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    done_file, ckpt_file = run_dir / "done.json", run_dir / "last.pt"
    best_file = run_dir / "best.pt"
    if done_file.exists():
        done = read_json(done_file)
        if best_file.exists():
            kept = torch.load(best_file, map_location="cpu", weights_only=True)
            for name, st in kept.items():
                _load_module_state(phase.model, name, st)
        log.info("%s: already finished, reusing %s", phase.name, run_dir)
        return PhaseResult(done["history"], done["best"], done["metrics"])

    history: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    best_states: dict[str, dict[str, torch.Tensor]] = {}
    start = 0
    if ckpt_file.exists():
        state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        phase.model.load_state_dict(state["model"], strict=True)
        phase.optimizer.load_state_dict(state["optimizer"])
        if phase.scheduler is not None and state.get("scheduler") is not None:
            phase.scheduler.load_state_dict(state["scheduler"])
        history, best, best_states = state["history"], state["best"], state["best_states"]
        start = int(state["epoch"]) + 1
        log.info("%s: resuming at epoch %d from %s", phase.name, start + 1, ckpt_file)

    _broadcast(phase.model, rt)
    for epoch in range(start, phase.epochs):
        torch.manual_seed(phase.seed * 7919 + epoch)
        phase.model.train()
        t0, total, count = time.monotonic(), 0.0, 0
        bar = tqdm(
            _batches(phase, rt, epoch),
            desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
            disable=not (progress and rt.is_main),
            leave=False,
        )
        for raw in bar:
            batch = _to(raw, rt.device)
            if phase.before_step is not None:
                batch = phase.before_step(batch)
            n = int(batch["label"].shape[0]) if "label" in batch else 1
            if n < 2:  # a batch of one breaks BatchNorm in train mode; it is 1 sample of N
                continue
            phase.optimizer.zero_grad(set_to_none=True)
            with rt.autocast():
                loss = phase.loss(batch)
            loss.backward()
            _sync_grads(phase.params, rt)
            if phase.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(phase.params, phase.grad_clip)
            phase.optimizer.step()
            total += float(loss.detach()) * n
            count += n
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        if phase.scheduler is not None:
            phase.scheduler.step()
        phase.model.eval()
        with torch.no_grad(), rt.autocast():
            metrics = phase.evaluate()
        row = {
            "epoch": epoch + 1,
            "loss": total / max(count, 1),
            "seconds": round(time.monotonic() - t0, 1),
            "lr": phase.optimizer.param_groups[0]["lr"],
            **metrics,
        }
        history.append(row)
        for name, key in phase.select.items():
            value = _score(metrics, key)
            prev = best.get(name)
            better = prev is None or (
                not math.isnan(value) and (math.isnan(prev["value"]) or value > prev["value"])
            )
            if phase.keep == "last" or better:
                best[name] = {"epoch": epoch + 1, "metric": key, "value": value}
                best_states[name] = _module_state(phase.model, name)
        log.info(
            "%s epoch %d/%d %s",
            phase.name,
            epoch + 1,
            phase.epochs,
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if k != "epoch"
            ),
        )
        if rt.is_main:
            atomic_torch_save(
                {
                    "epoch": epoch,
                    "model": phase.model.state_dict(),
                    "optimizer": phase.optimizer.state_dict(),
                    "scheduler": phase.scheduler.state_dict() if phase.scheduler else None,
                    "history": history,
                    "best": best,
                    "best_states": best_states,
                },
                ckpt_file,
            )

    for name, st in best_states.items():
        _load_module_state(phase.model, name, st)
    phase.model.eval()
    with torch.no_grad(), rt.autocast():
        final = phase.evaluate() if best_states else {}
    if rt.is_main:
        # Keep only the selected weights of a finished phase (last.pt holds the whole model
        # and optimiser state: hundreds of MB per Inf-Net round).
        atomic_torch_save(best_states, best_file)
        write_json(done_file, {"history": history, "best": best, "metrics": final})
        ckpt_file.unlink(missing_ok=True)
    return PhaseResult(history, best, final)
