"""The study decision: aggregation chooser, Platt calibration, operating points, card field,
and how ``[priority]`` levels naming operating points resolve (with and without a card)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from triaged.pipeline.calibration import (
    Aggregation,
    Calibration,
    FittedOn,
    OperatingPoint,
    StudyDecision,
    Target,
    aggregate_score,
    calibrate_logits,
    choose_aggregation,
    fit_platt,
    fit_study_decision,
    operating_point,
    score_logit,
)
from triaged.pipeline.definition import PipelineError, PrioritySection
from triaged.pipeline.models import load_models
from triaged.pipeline.priority import prioritise, resolve_levels
from triaged.pipeline.scoring import Skip, StudyScore, score_study
from triaged.registry import ModelCard, ModelStore
from triaged.synthetic import generate_study
from triaged.validation import metrics as V

SLICES = 32


def _diffuse(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[int]]:
    """Disease raises every slice a little; clear studies have one or two artefact spikes."""
    studies, labels = [], []
    for i in range(n):
        positive = i % 2
        p = rng.uniform(0.05, 0.35, SLICES) + (0.25 if positive else 0.0)
        if not positive:
            p[rng.choice(SLICES, 2, replace=False)] = rng.uniform(0.95, 1.0, 2)
        studies.append(p)
        labels.append(positive)
    return studies, labels


def _focal(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[int]]:
    """Disease is one focal slice; everything else is noise that drowns it in any average."""
    studies, labels = [], []
    for i in range(n):
        positive = i % 2
        p = rng.uniform(0.0, 0.7, SLICES)
        if positive:
            p[rng.integers(SLICES)] = rng.uniform(0.9, 1.0)
        else:
            p = np.minimum(p, 0.8)
        studies.append(p)
        labels.append(positive)
    return studies, labels


def test_the_chooser_picks_mean_for_diffuse_disease_and_max_for_a_focal_one() -> None:
    rng = np.random.default_rng(0)
    best, every = choose_aggregation(*_diffuse(rng, 40))
    assert best.aggregation.method in ("mean", "quantile")  # spikes fool max/top-k/noisy-OR
    assert best.auc == pytest.approx(1.0)
    by = {c.aggregation.describe(): c for c in every}
    assert by["max"].auc < 0.8 and by["mean of top 3"].auc < 0.9

    best, every = choose_aggregation(*_focal(rng, 40))
    assert best.aggregation.method == "max"
    assert {c.aggregation.describe(): c for c in every}["mean"].auc < 0.8


def test_platt_calibration_reduces_ece_of_overconfident_scores() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    true_logit = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.5, y.size)
    overconfident = 1 / (1 + np.exp(-4.0 * true_logit + 3.0))  # scale and shift wrong
    z = np.log(overconfident) - np.log1p(-overconfident)
    cal = fit_platt(z, y)
    before, after = V.ece(y, overconfident), V.ece(y, calibrate_logits(z, cal))
    assert after < before / 2, (before, after)


def test_platt_refuses_a_score_that_falls_with_the_label() -> None:
    with pytest.raises(ValueError, match="does not increase"):
        fit_platt(np.array([3.0, 2.0, -1.0, -2.0]), np.array([0, 0, 1, 1]))


@pytest.mark.parametrize(
    "metric,minimum",
    [("specificity", 0.9), ("sensitivity", 0.9), ("specificity", 0.75), ("sensitivity", 0.6)],
)
def test_operating_points_meet_their_target_on_the_fitting_studies(
    metric: str, minimum: float
) -> None:
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 30)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0.001, 0.999)
    op = operating_point(y, p, Target("x", metric, minimum))  # type: ignore[arg-type]
    pred = p >= op.threshold
    sens, spec = pred[y == 1].mean(), (~pred[y == 0]).mean()
    achieved = sens if metric == "sensitivity" else spec
    assert achieved >= minimum
    assert (op.val_sensitivity, op.val_specificity) == pytest.approx((sens, spec))
    # the best threshold: the next study past it would break the target
    others = np.sort(p[p < op.threshold] if metric == "specificity" else p[p >= op.threshold])
    if others.size:
        nxt = others[-1] if metric == "specificity" else np.nextafter(others[0], 1.0)
        pred2 = p >= nxt
        again = pred2[y == 1].mean() if metric == "sensitivity" else (~pred2[y == 0]).mean()
        assert again < minimum


def test_fit_study_decision_on_separable_studies_ranks_and_records_provenance() -> None:
    rng = np.random.default_rng(3)
    slices, labels = _diffuse(rng, 20)
    d = fit_study_decision(slices, labels, [f"P{i // 2}" for i in range(20)], source="x.csv")
    p = np.array([d.probability(s)[0] for s in slices])
    y = np.array(labels)
    assert p[y == 1].min() > p[y == 0].max()
    urgent = d.point("urgent")
    assert urgent is not None and urgent.val_sensitivity == 1.0
    assert urgent.val_specificity is not None and urgent.val_specificity >= 0.9
    assert (d.fitted_on.n_studies, d.fitted_on.n_patients) == (20, 10)
    assert d.fitted_on.n_positive == 10 and d.fitted_on.source == "x.csv"


def test_aggregations_do_not_depend_on_slice_order() -> None:
    p = np.random.default_rng(4).uniform(0, 1, 17)
    for agg in (
        Aggregation(method="mean"),
        Aggregation(method="mean_top_k", k=3),
        Aggregation(method="quantile", q=0.75),
        Aggregation(method="noisy_or"),
    ):
        assert aggregate_score(p, agg) == aggregate_score(p[::-1].copy(), agg)
    # noisy-OR saturates in probability but its logit stays finite and ordered
    low, high = np.full(32, 0.5), np.full(32, 0.6)
    noisy = Aggregation(method="noisy_or")
    assert np.isfinite(score_logit(high, noisy)) and score_logit(high, noisy) > score_logit(
        low, noisy
    )


def _decision(**thresholds: float) -> StudyDecision:
    return StudyDecision(
        aggregation=Aggregation(method="mean"),
        calibration=Calibration(a=1.0, b=0.0),
        operating_points=[
            OperatingPoint(name=n, target="specificity", minimum=0.9, threshold=t)
            for n, t in thresholds.items()
        ],
        fitted_on=FittedOn(n_studies=10, n_patients=10, n_positive=5, n_negative=5),
    )


LEVELS = {
    "levels": [
        {"operating_point": "urgent", "min_probability": 0.8, "priority": 100, "flag": True},
        {"operating_point": "review", "priority": 50},
    ]
}


def test_levels_take_thresholds_from_the_card_and_name_the_point_that_fired() -> None:
    section = PrioritySection.model_validate(LEVELS)
    levels = resolve_levels(section, _decision(urgent=0.3, review=0.1))
    assert not isinstance(levels, str)
    assert [(lv.threshold, lv.priority) for lv in levels] == [(0.3, 100), (0.1, 50)]
    fired = prioritise(0.35, section, None, levels)
    assert (fired.priority, fired.flag, fired.operating_point) == (100, True, "urgent")
    assert prioritise(0.2, section, "STAT", levels).operating_point == "review"
    assert prioritise(0.05, section, None, levels).operating_point is None


def test_levels_without_a_card_decision_fall_back_or_give_a_reason() -> None:
    section = PrioritySection.model_validate(LEVELS)
    reason = resolve_levels(section, None)
    assert isinstance(reason, str) and "'review'" in reason and "validate --fit" in reason
    both = PrioritySection.model_validate(
        {
            "levels": [
                {"operating_point": "urgent", "min_probability": 0.8, "priority": 100, "flag": True}
            ]
        }
    )
    levels = resolve_levels(both, None)
    assert not isinstance(levels, str) and levels[0].threshold == 0.8
    assert prioritise(0.85, both, None, levels).operating_point is None
    missing = resolve_levels(section, _decision(urgent=0.3))
    assert isinstance(missing, str) and "'review'" in missing and "urgent" in missing


def test_a_level_needs_a_threshold_of_some_kind(tiny) -> None:
    with pytest.raises(PipelineError, match="operating_point or min_probability"):
        tiny.pipeline(priority={"levels": [{"priority": 3}]})
    with pytest.raises(PipelineError, match="one operating_point"):
        tiny.pipeline(
            priority={
                "levels": [
                    {"operating_point": "a", "priority": 3},
                    {"operating_point": "a", "priority": 4},
                ]
            }
        )


def test_an_old_card_without_the_field_loads(store: ModelStore) -> None:
    raw = store.get("fusion", "v1").card.model_dump(mode="json")
    raw.pop("study_decision")
    assert ModelCard.model_validate(raw).study_decision is None


def test_scoring_uses_the_card_decision_and_skips_without_one(tmp_path: Path, tiny) -> None:
    import torch

    torch.set_num_threads(1)
    store = ModelStore(tmp_path / "models")
    v1 = tiny.register_fusion(store, seed=0)
    study = generate_study(tmp_path / "s", seed=7, positive=True, slices=12, size=64)
    pipeline = tiny.pipeline(priority=LEVELS)
    skipped = score_study(study.files, pipeline, load_models(pipeline, store))
    assert isinstance(skipped, Skip) and "no study decision" in skipped.reason

    decision = _decision(urgent=0.0, review=0.0).model_copy(  # everything reaches urgent
        update={"calibration": Calibration(a=2.0, b=-1.0)}
    )
    card = v1.card.model_copy(update={"study_decision": decision})
    v2 = store.register("fusion", v1.weights_path, card)
    store.promote("fusion", v2.version)
    scored = score_study(study.files, pipeline, load_models(pipeline, store))
    assert isinstance(scored, StudyScore)
    slices = np.asarray(scored.fusion_slice_probabilities)
    assert scored.raw_probability == pytest.approx(slices.mean())
    logit = np.log(slices.mean()) - np.log1p(-slices.mean())
    assert scored.fusion_probability == pytest.approx(1 / (1 + np.exp(1.0 - 2.0 * logit)))
    assert (scored.operating_point, scored.priority, scored.flag) == ("urgent", 100, True)
    assert scored.to_dict()["calibrated_on"] == 10


def test_priority_never_falls_as_the_probability_rises() -> None:
    """On well separated studies "review" (sensitivity >= 0.9, most specific) can come out
    above "urgent" (specificity >= 0.9, most sensitive): a study above both is still urgent."""
    section = PrioritySection.model_validate(LEVELS)
    levels = resolve_levels(section, _decision(urgent=0.3, review=0.6))
    assert not isinstance(levels, str)
    for p, expected in ((0.2, 0), (0.4, 100), (0.7, 100)):
        got = prioritise(p, section, None, levels)
        assert got.priority == expected, p
        assert got.operating_point == (None if expected == 0 else "urgent")
