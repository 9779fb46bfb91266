"""The model store: immutability, cards, live pointer, rollback, concurrency."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from triaged.registry import (
    Architecture,
    ModelCard,
    ModelNotFoundError,
    ModelStore,
    RegistryError,
    TrainingData,
    VersionExistsError,
)


def _card(**kw: object) -> ModelCard:
    base: dict[str, object] = {
        "architecture": Architecture(name="cbam_cnn", params={"input_size": 32, "attention": True}),
        "data": TrainingData(sources=["synthetic"], split="random 80/20", counts={"train": 8}),
        "metrics": {"auc": 0.9},
        "seed": 7,
    }
    base.update(kw)
    return ModelCard(**base)  # type: ignore[arg-type]


def _weights(value: float = 1.0) -> dict[str, torch.Tensor]:
    w = torch.full((3, 2), value)
    return {"layer.weight": w, "layer.bias": torch.arange(3.0), "tied": w.t()}


def test_register_roundtrip_and_layout(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    mv = store.register("fusion", _weights(2.0), _card())
    assert mv.version == "v1"
    assert (tmp_path / "fusion" / "v1" / "weights.safetensors").is_file()
    card = json.loads((tmp_path / "fusion" / "v1" / "card.json").read_text())
    assert card["architecture"] == {
        "name": "cbam_cnn",
        "params": {"input_size": 32, "attention": True},
    }
    assert card["seed"] == 7 and card["code"]["triaged"]
    assert len(card["weights_sha256"]) == 64
    again = store.get("fusion", "v1")
    sd = again.state_dict()
    assert torch.equal(sd["layer.weight"], torch.full((3, 2), 2.0))
    assert torch.equal(sd["tied"], torch.full((2, 3), 2.0))
    assert again.card == mv.card
    assert not [p for p in (tmp_path / "fusion").iterdir() if p.name.startswith(".tmp")]


def test_versions_are_numbered_and_immutable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for i in range(11):
        store.register("m", _weights(float(i)), _card())
    assert [v.version for v in store.list("m")] == [f"v{i}" for i in range(1, 12)]
    store.register("m", _weights(), _card(), version="site-a")
    with pytest.raises(VersionExistsError):
        store.register("m", _weights(9.0), _card(), version="site-a")
    with pytest.raises(VersionExistsError):
        store.register("m", _weights(9.0), _card(), version="v3")
    assert torch.equal(store.get("m", "v3").state_dict()["layer.weight"], torch.full((3, 2), 2.0))


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    mv = store.register("m", _weights(), _card())
    save_file({"layer.weight": torch.zeros(3, 2)}, str(mv.weights_path))
    with pytest.raises(RegistryError, match="does not match"):
        mv.state_dict()


def test_register_from_file_accepts_safetensors_only(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    good = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, str(good))
    mv = store.register("m", good, _card())
    assert torch.equal(mv.state_dict()["a"], torch.ones(2))
    pickled = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, pickled)
    with pytest.raises(RegistryError, match="not a safetensors"):
        store.register("m", pickled, _card())
    assert [v.version for v in store.list("m")] == ["v1"]


def test_invalid_names_and_unknown_models(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(RegistryError):
        store.register("../evil", _weights(), _card())
    with pytest.raises(ModelNotFoundError):
        store.get("nope", "v1")
    with pytest.raises(ModelNotFoundError):
        store.list("nope")
    assert store.list() == [] and store.live("nope") is None and store.live_token("nope") is None


def test_card_validation_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError):
        ModelCard.model_validate(
            {"architecture": {"name": "x"}, "data": {"sources": ["s"], "split": "x"}, "bogus": 1}
        )
    with pytest.raises(ValueError):
        TrainingData(sources=[], split="x")


def test_promote_rollback_and_live_token(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    v1 = store.register("m", _weights(1.0), _card())
    v2 = store.register("m", _weights(2.0), _card())
    assert store.live("m") is None
    with pytest.raises(RegistryError, match="no earlier live"):
        store.rollback("m")
    store.promote("m", v1.version)
    t1 = store.live_token("m")
    live = store.live("m")
    assert live is not None and live.version == "v1"
    store.promote("m", v2.version, reason="better AUC")
    t2 = store.live_token("m")
    assert t2 != t1
    live = store.live("m")
    assert live is not None and live.version == "v2"
    back = store.rollback("m")
    assert back.version == "v1"
    live = store.live("m")
    assert live is not None and live.version == "v1"
    assert store.live_token("m") not in (t1, t2)
    with pytest.raises(RegistryError):
        store.rollback("m")
    assert [e["action"] for e in store.history("m")] == ["promote", "promote", "rollback"]
    assert store.history("m")[1]["reason"] == "better AUC"
    with pytest.raises(ModelNotFoundError):
        store.promote("m", "v9")


def test_concurrent_promotes_keep_a_consistent_history(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    versions = [store.register("m", _weights(float(i)), _card()).version for i in range(6)]
    threads = [threading.Thread(target=store.promote, args=("m", v)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = json.loads((tmp_path / "m" / "live.json").read_text())
    # Every promote was recorded and no earlier live version was lost by a racing writer.
    assert len(state["log"]) == 6
    assert sorted([*state["previous"], state["version"]]) == sorted(versions)


def test_concurrent_registers_get_distinct_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    out: list[str] = []
    lock = threading.Lock()

    def reg(i: int) -> None:
        v = store.register("m", _weights(float(i)), _card()).version
        with lock:
            out.append(v)

    threads = [threading.Thread(target=reg, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == [f"v{i}" for i in range(1, 6)]


def test_one_reading_of_a_model_reference(tmp_path: Path) -> None:
    """``name:version`` is that version; ``name`` and ``name:live`` the live one."""
    store = ModelStore(tmp_path)
    store.register("m", _weights(1.0), _card())
    store.register("m", _weights(2.0), _card())
    with pytest.raises(ModelNotFoundError, match="no live version of 'm'"):
        store.resolve("m")
    store.promote("m", "v1")
    assert store.resolve("m:v2").version == "v2"
    assert store.resolve("m").version == store.resolve("m:live").version == "v1"
    with pytest.raises(ModelNotFoundError):
        store.resolve("m:v9")
