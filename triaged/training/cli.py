"""``triaged retrain``: argument definitions and the command body, for ``triaged/cli.py``.

Usage from the lead's CLI::

    p = sub.add_parser("retrain", help=...)
    training_cli.add_arguments(p)
    ...
    return training_cli.run(args, settings)     # exit status

Command-line options override ``--config`` (TOML/JSON with :class:`RetrainOptions` keys,
optionally under ``[retrain]``); the model store defaults to ``[models] store``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

CHEAP_CPU: dict[str, dict[str, Any]] = {
    "fusion": {"input_size": 128, "epochs": 8, "lr_step": 6, "batch_size": 16, "infnet_size": 128},
    "semi": {
        "input_size": 128,
        "epochs_first": 6,
        "epochs_per_round": 2,
        "chunk": 400,
        "batch_size": 8,
        "scales": [1.0],
    },
    "baseline": {},
}
"""``--cheap``: a setting that finishes on 2 CPU cores in hours, not days (docs/training.md)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML/JSON file of retrain options")
    parser.add_argument(
        "--data",
        action="append",
        metavar="KIND:PATH",
        help="covid-ct:, semiseg:, medseg:, manifest:CSV, labels:EXPORT, synthetic:N (repeatable)",
    )
    parser.add_argument("--stages", help="comma list of infnet,1,2,3,cbam,plain (default 1,2,3)")
    parser.add_argument("--backbone", choices=["efficientnet-lite0", "densenet169", "resnet50"])
    parser.add_argument("--init", help="random | imagenet (Lite0 only) | PATH to local weights")
    parser.add_argument("--epochs", type=int, help="epochs per fusion stage (default 50)")
    parser.add_argument("--input-size", type=int, help="fusion input size (default 224)")
    parser.add_argument("--batch-size", type=int, help="fusion batch size (default 32)")
    parser.add_argument(
        "--lr-step",
        type=int,
        help="fusion stages: learning rate x0.1 after this many epochs (default 30)",
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--cheap",
        action="store_true",
        help="reduced sizes/epochs that fit a 2-core CPU (docs/training.md)",
    )
    parser.add_argument("--run-dir", type=Path, help="run folder; the same folder resumes")
    parser.add_argument("--store", type=Path, help="model store (default: [models] store)")
    parser.add_argument(
        "--start-from",
        metavar="NAME:VERSION",
        help="fusion version to continue from (to run stage 2 or 3 alone)",
    )
    parser.add_argument(
        "--infnet-from",
        metavar="NAME:VERSION",
        help="Inf-Net version for stage 2 (default: the live infnet)",
    )
    parser.add_argument(
        "--promote",
        action="store_true",
        help="make new versions live if at least as good on validation",
    )
    parser.add_argument(
        "--report-test",
        action="store_true",
        help="score the test split once at the end (never used to select)",
    )
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 0 = all cores but one, "
        "so a retrain beside the daemon does not stall)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def options_from_args(args: argparse.Namespace, settings: Any = None) -> Any:
    """Merge ``--config``, ``--cheap`` and explicit options into :class:`RetrainOptions`."""
    from triaged.training.retrain import RetrainOptions, read_options_file

    over: dict[str, Any] = {}
    fusion: dict[str, Any] = {}
    semi: dict[str, Any] = {}
    if args.cheap:
        fusion.update(CHEAP_CPU["fusion"])
        semi.update(CHEAP_CPU["semi"])
    for flag, key in (
        ("epochs", "epochs"),
        ("input_size", "input_size"),
        ("batch_size", "batch_size"),
        ("lr_step", "lr_step"),
    ):
        if getattr(args, flag) is not None:
            fusion[key] = getattr(args, flag)
    if args.data:
        over["data"] = args.data
    if args.stages:
        over["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    for flag in (
        "backbone",
        "init",
        "seed",
        "run_dir",
        "start_from",
        "infnet_from",
        "precision",
        "threads",
    ):
        if getattr(args, flag) is not None:
            over[flag] = getattr(args, flag)
    if args.store is not None:
        over["store"] = args.store
    elif settings is not None:
        over["store"] = settings.models.store
    if args.promote:
        over["promote"] = True
    if args.report_test:
        over["report_test"] = True
    if args.no_progress:
        over["progress"] = False
    if args.config is not None:
        merged = read_options_file(args.config)
        for section, extra in (("fusion", fusion), ("semi", semi)):
            merged[section] = {**merged.get(section, {}), **extra}
        return RetrainOptions.model_validate({**merged, **over})
    if fusion:
        over["fusion"] = fusion
    if semi:
        over["semi"] = semi
    if "data" not in over:
        raise ValueError("give at least one --data KIND:PATH (or a --config with data)")
    return RetrainOptions.model_validate(over)


def run(args: argparse.Namespace, settings: Any = None) -> int:
    """Run ``triaged retrain``; user mistakes are one line on stderr and exit status 2."""
    from triaged.registry import RegistryError
    from triaged.training.dicom_data import DataError
    from triaged.training.retrain import RetrainError, retrain

    try:
        opts = options_from_args(args, settings)
        result = retrain(opts)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        print(f"triaged retrain: {loc}: {err['msg']}", file=sys.stderr)
        return 2
    except (RetrainError, DataError, RegistryError, FileNotFoundError, ValueError) as exc:
        print(f"triaged retrain: {exc}", file=sys.stderr)
        return 2
    print(f"run folder: {result.run_dir}")
    for line in result.messages:
        print(line)
    if opts.promote and not all(result.promoted.values()):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m triaged.training.cli``: the same command without the daemon's config."""
    parser = argparse.ArgumentParser(prog="triaged retrain", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
