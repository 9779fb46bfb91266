"""Training: end-to-end retrain, staged freezing, exact resume, promotion guard, CLI errors.

Everything runs on phantom slices at 64x64 with one CPU thread; the whole file takes well
under two minutes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from triaged.registry import ModelStore
from triaged.training import retrain as retrain_mod
from triaged.training.builders import load_version
from triaged.training.cli import main as cli_main
from triaged.training.datasets import Sample, synthetic
from triaged.training.loop import setup_runtime
from triaged.training.retrain import RetrainError, RetrainOptions, evaluate_version, retrain
from triaged.training.staged import FusionSettings, build_fusion, run_stage

TINY_FUSION = {"input_size": 64, "infnet_size": 32, "epochs": 1, "batch_size": 4}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Sample]]:
    return synthetic(tmp_path_factory.mktemp("phantoms"), 10, size=64, seed=4)


def test_end_to_end_retrain_registers_and_promotes(tmp_path: Path) -> None:
    opts = RetrainOptions(
        data=["synthetic:12"],
        stages=["infnet", "1", "2", "3", "cbam"],
        init="random",
        fusion=TINY_FUSION,
        semi={
            "input_size": 64,
            "epochs_first": 1,
            "epochs_per_round": 1,
            "chunk": 2,
            "max_rounds": 2,
            "batch_size": 4,
            "scales": [0.75, 1.0],
        },
        baseline={"size": 64, "epochs": 1, "batch_size": 4},
        store=tmp_path / "store",
        run_dir=tmp_path / "run",
        promote=True,
        precision="fp32",
        progress=False,
    )
    result = retrain(opts)
    assert [v.ref for v in result.versions] == ["infnet:v1", "fusion:v1", "cbam-cnn:v1"]
    assert result.promoted == {"infnet": True, "fusion": True, "cbam-cnn": True}
    store = ModelStore(tmp_path / "store")
    live = store.live("fusion")
    assert live is not None and live.version == "v1"
    card = live.card
    assert card.architecture.name == "fusion"
    assert card.architecture.params["input_size"] == 64
    assert card.preprocessing["size"] == 64
    assert card.training["stages_run"] == [1, 2, 3] and card.seed == 0
    assert card.data.sources == ["synthetic:12"] and card.data.counts["val"] >= 1
    assert 0.0 <= card.metrics["val"]["auc"] <= 1.0 and len(card.metrics["val"]["auc_ci"]) == 2
    assert card.code.triaged
    # The fusion version carries its out-of-distribution fit on the training slices.
    assert card.ood is not None and card.ood.slices == card.data.counts["train"]
    assert card.ood.data == ["synthetic:12"] and (live.path / card.ood.file).is_file()
    # Algorithm 1 ran round 0 plus two pseudo-label rounds of two slices each.
    rounds = sorted(p.name for p in (tmp_path / "run" / "infnet").glob("round_*"))
    assert rounds == ["round_00", "round_01", "round_02"]
    pseudo = list((tmp_path / "run" / "infnet" / "pseudo").rglob("*.png"))
    assert len(pseudo) == 4
    assert store.get("infnet", "v1").card.metrics["rounds"][2][""]["metric"] == "dice"
    # The registered fusion model rebuilds from the store alone and carries the new Inf-Net.
    model = load_version(live)
    infnet = load_version(store.get("infnet", "v1"))
    for k, v in infnet.state_dict().items():
        assert torch.equal(model.infnet.state_dict()[k], v)  # type: ignore[union-attr]
    out = model(torch.rand(2, 1, 64, 64))
    assert out.p_fusion.shape == (2,)
    # Registered versions evaluate on new slices exactly as their cards say.
    fresh = synthetic(tmp_path / "fresh", 6, size=64, seed=9)
    labelled = fresh["train"] + fresh["val"]
    cnn_fig = evaluate_version(store.get("cbam-cnn", "v1"), labelled)
    assert cnn_fig["n"] == 6 and 0.0 <= cnn_fig["accuracy"] <= 1.0
    seg_fig = evaluate_version(store.get("infnet", "v1"), [x for x in labelled if x.label])
    assert 0.0 <= seg_fig["dice"] <= 1.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["stages"] == ["infnet", "1", "2", "3", "cbam"]
    # Same run folder, different options: refused rather than silently mixed.
    with pytest.raises(RetrainError, match="other options"):
        retrain(opts.model_copy(update={"seed": 1}))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    return {
        k.split(".")[0]
        for k, v in before.items()
        if v.dtype.is_floating_point and not torch.equal(v, after[k])
    }


def test_each_stage_changes_only_its_modules(
    tmp_path: Path, phantoms: dict[str, list[Sample]]
) -> None:
    s = FusionSettings(init="random", **TINY_FUSION)  # type: ignore[arg-type]
    model, _ = build_fusion(s)
    rt = setup_runtime("fp32", "cpu")
    expected = {1: {"global_branch"}, 2: {"heatmap_branch", "infected_branch"}, 3: {"fusion_head"}}
    for stage, modules in expected.items():
        before = _snapshot(model)
        run_stage(
            stage,
            model,
            phantoms["train"],
            phantoms["val"],
            s,
            tmp_path / f"s{stage}",
            rt,
            progress=False,
        )
        # Weights *and* BatchNorm statistics of frozen modules stay exactly as they were.
        assert _changed(before, model) == modules, f"stage {stage}"
    assert (tmp_path / "s3" / "features.pt").exists()


def test_resume_after_a_crash_equals_an_uninterrupted_run(
    tmp_path: Path, phantoms: dict[str, list[Sample]], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = FusionSettings(
        init="random", input_size=64, infnet_size=32, epochs=3, lr_step=2, batch_size=4, seed=11
    )
    rt = setup_runtime("fp32", "cpu")
    torch.manual_seed(0)
    straight, _ = build_fusion(s)
    res = run_stage(
        1, straight, phantoms["train"], phantoms["val"], s, tmp_path / "a", rt, progress=False
    )
    assert [row["lr"] for row in res.history] == pytest.approx([0.01, 0.001, 0.001])

    from triaged.training import staged

    real = staged.head_metrics
    calls = {"n": 0}

    def crash_on_third(*args: object, **kw: object) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies during epoch 3
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(staged, "head_metrics", crash_on_third)
    torch.manual_seed(0)
    crashed, _ = build_fusion(s)
    with pytest.raises(KeyboardInterrupt):
        run_stage(
            1, crashed, phantoms["train"], phantoms["val"], s, tmp_path / "b", rt, progress=False
        )
    assert (tmp_path / "b" / "last.pt").exists() and not (tmp_path / "b" / "done.json").exists()
    monkeypatch.setattr(staged, "head_metrics", real)
    torch.manual_seed(123)  # a fresh process: different initial weights, restored from disk
    resumed, _ = build_fusion(s)
    res_b = run_stage(
        1, resumed, phantoms["train"], phantoms["val"], s, tmp_path / "b", rt, progress=False
    )
    assert [r["loss"] for r in res_b.history] == [r["loss"] for r in res.history]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert not (tmp_path / "b" / "last.pt").exists() and (tmp_path / "b" / "best.pt").exists()


def test_promotion_requires_at_least_the_live_figure(
    tmp_path: Path, phantoms: dict[str, list[Sample]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from triaged.nets.cbam import BaselineCNN
    from triaged.registry import Architecture, ModelCard, TrainingData

    store = ModelStore(tmp_path)
    card = ModelCard(
        architecture=Architecture(name="baseline-cnn", params={"cbam": True, "size": 64}),
        data=TrainingData(sources=["synthetic"], split="x"),
        preprocessing={"size": 64},
    )
    net = BaselineCNN(cbam=True, size=64)
    old = store.register("cbam-cnn", net.state_dict(), card)
    store.promote("cbam-cnn", old.version)
    new = store.register("cbam-cnn", net.state_dict(), card)
    figures = {old.version: 0.8}

    def fake_figure(m: object, samples: object, c: object) -> float:
        return figures.get(getattr(m, "version", "new"), figures["new"])

    monkeypatch.setattr(retrain_mod, "_figure", fake_figure)
    figures["new"] = 0.7
    ok, why = retrain_mod._promote(store, new, net, phantoms["val"])
    assert not ok and "NOT promoted" in why and "0.7000 < 0.8000" in why
    assert store.live("cbam-cnn").version == old.version  # type: ignore[union-attr]
    figures["new"] = 0.8
    ok, why = retrain_mod._promote(store, new, net, phantoms["val"])
    assert ok and store.live("cbam-cnn").version == new.version  # type: ignore[union-attr]


def test_cli_reports_user_mistakes_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["--data", "nope:1", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("triaged retrain:") and "\n" not in err and "KIND:PATH" in err
    assert (
        cli_main(
            [
                "--data",
                f"covid-ct:{tmp_path / 'missing'}",
                "--run-dir",
                str(tmp_path / "r"),
                "--store",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["--data", "synthetic:4", "--stages", "9", "--store", str(tmp_path)]) == 2
    assert "unknown stage" in capsys.readouterr().err


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.nn.functional as F

    from triaged.training.loop import Phase, run_phase
    from triaged.training.staged import FeatureSet

    os.environ.update(
        {
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    rt = setup_runtime("fp32", "cpu")
    torch.manual_seed(100 + rank)  # different initial weights per rank: rank 0's must win
    model = torch.nn.Linear(8, 1)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(24, 8, generator=g)
    data = FeatureSet(feats, (feats[:, 0] > 0).float())
    phase = Phase(
        name="ddp",
        model=model,
        params=list(model.parameters()),
        train_set=data,
        loss=lambda b: F.binary_cross_entropy_with_logits(
            model(b["features"]).squeeze(1), b["label"]
        ),
        evaluate=lambda: {"auc": 0.5},
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        epochs=2,
        batch_size=4,
        select={"": "auc"},
        keep="last",
    )
    run_phase(phase, Path(out_dir) / "run", rt, progress=False)
    torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_torchrun_ranks_train_one_model(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(100)
    assert not torch.equal(a["weight"], torch.nn.Linear(8, 1).weight)  # it did train
    assert (tmp_path / "run" / "done.json").exists()


def test_training_threads_leave_one_core_free(monkeypatch: pytest.MonkeyPatch) -> None:
    from triaged.training import retrain as rt

    for cores, expected in (({0}, 1), ({0, 1}, 1), (set(range(8)), 7)):
        monkeypatch.setattr(rt.os, "sched_getaffinity", lambda _pid, c=cores: c)
        assert rt.training_threads(0) == expected
    assert rt.training_threads(3) == 3  # an explicit request wins


def test_explicit_flags_override_cheap_settings() -> None:
    import argparse

    from triaged.training import cli as tcli

    p = argparse.ArgumentParser()
    tcli.add_arguments(p)
    args = p.parse_args(
        [
            "--data",
            "covid-ct:/x",
            "--cheap",
            "--input-size",
            "224",
            "--epochs",
            "16",
            "--lr-step",
            "12",
        ]
    )
    opts = tcli.options_from_args(args)
    f = opts.fusion
    assert (f["input_size"], f["epochs"], f["lr_step"], f["batch_size"]) == (224, 16, 12, 16)
    assert opts.semi["input_size"] == 128  # the rest of --cheap stays
