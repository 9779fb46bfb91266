"""Fixtures for the pipeline tests: one torch thread, a tmp model store with tiny models.

The models are real architectures at toy sizes (EfficientNet-Lite0 branches at 32x32, the CBAM
CNN at 32x32), BatchNorm calibrated on phantom slices and the fusion head scaled so slice
probabilities spread over (0, 1): untrained networks otherwise answer 0.5 everywhere, and a
test could not see the key slice or the aggregation go wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from triaged.nets.calibrate import calibrate_batchnorm
from triaged.nets.cbam import BaselineCNN
from triaged.nets.fusion import FusionNet, pooled_features
from triaged.pipeline.definition import Pipeline, from_dict
from triaged.registry import Architecture, ModelCard, ModelStore, ModelVersion, TrainingData
from triaged.synthetic import generate_slices
from triaged.training.preprocess import Preprocessing

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Other engineers run tests at the same time on 2 cores: stay on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _card(arch: Architecture) -> ModelCard:
    return ModelCard(
        architecture=arch,
        data=TrainingData(sources=["synthetic phantoms"], split="none (test model)"),
        preprocessing=Preprocessing(size=SIZE).as_card(),
        seed=0,
    )


def tiny_fusion(seed: int) -> FusionNet:
    """A Lite0 fusion model at 32x32 whose fusion probability varies from slice to slice."""
    torch.manual_seed(seed)
    net = FusionNet(backbone="efficientnet-lite0", input_size=SIZE, infnet_size=SIZE)
    hu, _, _ = generate_slices(8, size=64, seed=seed)
    prep = Preprocessing(size=SIZE)
    x = torch.stack([prep(h, "hu") for h in hu])
    calibrate_batchnorm(net, [x])
    with torch.no_grad():
        logits = net.fusion_logit(pooled_features(net, x).fusion_input())
        net.fusion_head.weight.mul_(2.0 / logits.std())
        net.fusion_head.bias.zero_()
        net.fusion_head.bias.sub_(net.fusion_logit(pooled_features(net, x).fusion_input()).mean())
    return net.eval()


def register_fusion(store: ModelStore, seed: int, promote: bool = True) -> ModelVersion:
    net = tiny_fusion(seed)
    mv = store.register(
        "fusion", net.state_dict(), _card(Architecture(name="fusion", params=asdict(net.config)))
    )
    if promote:
        store.promote("fusion", mv.version)
    return mv


def register_cbam(store: ModelStore, seed: int = 0) -> ModelVersion:
    torch.manual_seed(seed)
    net = BaselineCNN(cbam=True, size=SIZE)
    arch = Architecture(name="baseline-cnn", params={"cbam": True, "size": SIZE})
    mv = store.register("cbam-cnn", net.state_dict(), _card(arch))
    store.promote("cbam-cnn", mv.version)
    return mv


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store with fusion:v1 and cbam-cnn:v1 live (shared by a module's tests: read-only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    s = ModelStore(tmp_path_factory.mktemp("models"))
    register_fusion(s, seed=0)
    register_cbam(s)
    torch.set_num_threads(before)
    return s


#: A pipeline like the shipped one, small: 8 slices, top 2, batch 4 (also the end-to-end tests').
TEST_PIPELINE: dict[str, object] = {
    "name": "test-ct",
    "version": "1",
    "preprocess": {"slices": 8},
    "models": [
        {"role": "fusion", "name": "fusion", "batch_size": 4},
        {"role": "cbam", "name": "cbam-cnn", "batch_size": 4},
    ],
    "outputs": {"top_slices": 2},
}


def make_pipeline(**sections: object) -> Pipeline:
    """:data:`TEST_PIPELINE`, with ``sections`` replaced."""
    raw = {**TEST_PIPELINE, **sections}
    return from_dict(raw, Path.cwd())


@pytest.fixture
def pipeline() -> Pipeline:
    return make_pipeline()


class Tiny:
    """The helpers above as a fixture (test modules cannot import conftest by name)."""

    card = staticmethod(_card)
    register_fusion = staticmethod(register_fusion)
    register_cbam = staticmethod(register_cbam)
    pipeline = staticmethod(make_pipeline)


@pytest.fixture
def tiny() -> type[Tiny]:
    return Tiny
