"""Loading the pipeline's models: live pointer, reuse, promotion, missing and mismatched models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from triaged.nets.cbam import BaselineCNN
from triaged.pipeline.models import ModelMismatchError, load_models
from triaged.registry import Architecture, ModelStore


def test_live_models_load_and_are_reused_until_the_store_changes(tmp_path: Path, tiny: Any) -> None:
    store = ModelStore(tmp_path)
    pipeline = tiny.pipeline()
    tiny.register_fusion(store, seed=0)
    tiny.register_cbam(store)
    first = load_models(pipeline, store)
    assert not first.missing
    assert first.fusion is not None and first.fusion.info.version == "v1"
    assert first.cbam is not None and first.cbam.preprocessing.size == 32
    assert first.device == torch.device("cpu")
    assert load_models(pipeline, store, previous=first) is first

    v2 = tiny.register_fusion(store, seed=1, promote=False)
    assert load_models(pipeline, store, previous=first) is first  # registered, not live
    store.promote("fusion", v2.version)
    second = load_models(pipeline, store, previous=first)
    assert second is not first
    assert second.fusion is not None and second.fusion.info.version == "v2"
    assert second.cbam is first.cbam  # the unchanged model is kept, not reloaded
    store.rollback("fusion")
    third = load_models(pipeline, store, previous=second)
    assert third.fusion is not None and third.fusion.info.version == "v1"


def test_missing_models_are_recorded_not_raised(tmp_path: Path, tiny: Any) -> None:
    store = ModelStore(tmp_path)
    models = load_models(tiny.pipeline(), store)
    assert models.fusion is None and models.cbam is None
    assert "no live version of 'fusion'" in models.missing["fusion"]
    tiny.register_fusion(store, seed=0, promote=False)
    pinned = tiny.pipeline(models=[{"role": "fusion", "name": "fusion", "version": "v7"}])
    assert "no version 'v7'" in load_models(pinned, store).missing["fusion"]
    exact = tiny.pipeline(models=[{"role": "fusion", "name": "fusion", "version": "v1"}])
    assert load_models(exact, store).fusion is not None  # a pinned version needs no live pointer


def test_a_model_that_does_not_fit_its_role_or_window_is_an_error(
    tmp_path: Path, tiny: Any
) -> None:
    store = ModelStore(tmp_path)
    plain = BaselineCNN(cbam=False, size=32)
    arch = Architecture(name="baseline-cnn", params={"cbam": False, "size": 32})
    mv = store.register("cbam-cnn", plain.state_dict(), tiny.card(arch))
    store.promote("cbam-cnn", mv.version)
    with pytest.raises(ModelMismatchError, match="role 'fusion' needs 'fusion'"):
        load_models(tiny.pipeline(models=[{"role": "fusion", "name": "cbam-cnn"}]), store)
    tiny.register_fusion(store, seed=0)
    with pytest.raises(ModelMismatchError, match="plain CNN"):
        load_models(tiny.pipeline(), store)
    tiny.register_cbam(store)
    assert load_models(tiny.pipeline(), store).cbam is not None
    with pytest.raises(ModelMismatchError, match="window W1500/L-600"):
        load_models(tiny.pipeline(preprocess={"window_level": -500.0}), store)
