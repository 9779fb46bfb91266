"""Pipeline files: the shipped one loads, every mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from triaged.pipeline.definition import PipelineError, load_pipeline

REPO = Path(__file__).resolve().parents[2]

BASE = """
name = "t"
version = "1"
[[models]]
role = "fusion"
name = "fusion"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_pipeline_loads_with_the_documented_defaults() -> None:
    p = load_pipeline(REPO / "pipelines" / "covid-ct.toml")
    assert p.ref == "covid-ct:1"
    assert (p.preprocess.window_width, p.preprocess.window_level) == (1500.0, -600.0)
    assert p.preprocess.slices == 32
    assert p.model("fusion") is not None and p.model("fusion").name == "fusion"  # type: ignore[union-attr]
    assert p.model("cbam") is not None and p.model("cbam").name == "cbam-cnn"  # type: ignore[union-attr]
    assert p.aggregate.method == "mean_top_k" and p.aggregate.k == 3
    assert [lv.min_probability for lv in p.priority.ordered_levels()] == [0.8, 0.5]
    assert p.priority.requested["STAT"] > p.priority.ordered_levels()[0].priority
    assert p.path == (REPO / "pipelines" / "covid-ct.toml").resolve()


def test_minimal_pipeline_gets_defaults(tmp_path: Path) -> None:
    p = load_pipeline(write(tmp_path, BASE))
    assert p.model("cbam") is None
    assert p.models[0].version == "live"
    assert p.outputs.sr and p.outputs.sc and p.outputs.seg


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("[preprocess]\nslicez = 3\n", "unknown key 'preprocess.slicez'"),
        ("[preprocess]\nslices = 0\n", "invalid value for 'preprocess.slices'"),
        ("[preprocess]\nwindow_width = -5\n", "'preprocess.window_width'"),
        ('[aggregate]\nmethod = "median"\n', "'aggregate.method'"),
        ("[priority]\nrequested = { URGENT = 5 }\n", "'priority.requested.URGENT"),
        (
            "[priority]\nlevels = [{ min_probability = 0.8, priority = 1, flagg = true }]\n",
            "unknown key 'priority.levels.0.flagg'",
        ),
        ("[priority]\nsr_threshold = 1.5\n", "'priority.sr_threshold'"),
        ("[preprocess]\nlung_hu = [-400, -950]\n", "'preprocess.lung_hu': lung_hu must be"),
        (
            "[priority]\nlevels = [{ min_probability = 0.5, priority = 1 },"
            " { min_probability = 0.5, priority = 2 }]\n",
            "'priority.levels': two priority levels",
        ),
        ('[outputs]\nsc = "maybe"\n', "'outputs.sc'"),
        ("[series]\nmax_axial_deviation_deg = 120\n", "'series.max_axial_deviation_deg'"),
        ("colour = 1\n", "unknown key 'colour'"),
        (
            '[[models]]\nrole = "fusion"\nname = "other"\n',
            "invalid value for 'models': exactly one",
        ),
        ('[[models]]\nrole = "lstm"\nname = "x"\n', "'models.1.role'"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, extra: str, fragment: str) -> None:
    text = BASE + "\n" + extra if extra.startswith("[") else extra + BASE
    with pytest.raises(PipelineError) as err:
        load_pipeline(write(tmp_path, text))
    message = str(err.value)
    assert fragment in message
    assert "p.toml" in message and "\n" not in message


def test_missing_models_and_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="missing key 'models'"):
        load_pipeline(write(tmp_path, 'name = "t"\nversion = "1"\n'))
    with pytest.raises(PipelineError, match="not valid TOML"):
        load_pipeline(write(tmp_path, "name = \n"))
    with pytest.raises(PipelineError, match="not found"):
        load_pipeline(tmp_path / "absent.toml")


def test_model_store_path_is_relative_to_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    p = load_pipeline(write(sub, 'model_store = "../store"\n' + BASE))
    assert p.model_store == (tmp_path / "store").resolve()
