"""Configuration: exact keys, errors that name the key, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from triaged.config import ConfigError, load


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "triaged.toml"
    cfg.parent.mkdir()
    cfg.write_text(
        '[storage]\nspool_dir = "../spool"\n[database]\nurl = "sqlite:///db/w.db"\n'
        '[dicom]\nallowed_calling_aets = ["PACS ", "CT1"]\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
    )
    s = load(cfg, environ={})
    assert s.storage.spool_dir == (tmp_path / "spool").resolve()
    assert s.database.url == f"sqlite:///{(tmp_path / 'etc' / 'db' / 'w.db').resolve()}"
    assert s.dicom.allowed_calling_aets == ["PACS", "CT1"]
    assert s.destinations[0].port == 4242
    assert s.assembly.quiet_seconds > 0 and s.assembly.max_wait_seconds > 0
    assert s.path == cfg.resolve()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[dicom]\naetitle = 'X'\n", "dicom.aetitle"),
        ("[dicom]\nport = 70000\n", "dicom.port"),
        ("[storage]\nmin_free_mb = 'lots'\n", "storage.min_free_mb"),
        ("[assembly]\nquiet_seconds = -1\n", "assembly.quiet_seconds"),
        ("[database]\nurl = 'mysql://x'\n", "database.url"),
        ("[colour]\nx = 1\n", "colour"),
        ("[[destinations]]\nname = 'p'\nhost = 'h'\nport = 1\n", "destinations.0.ae_title"),
    ],
)
def test_invalid_key_is_named(tmp_path: Path, text: str, named: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(cfg, environ={})
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[dicom\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.toml", environ={})


def test_environment_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[dicom]\nport = 104\n")
    env = {
        "TRIAGED_DICOM__PORT": "11113",
        "TRIAGED_DATABASE__URL": "postgresql+psycopg://u@db/t",
        "TRIAGED_DICOM__ALLOWED_CALLING_AETS": '["A", "B"]',
        "UNRELATED": "1",
    }
    s = load(cfg, environ=env)
    assert s.dicom.port == 11113
    assert s.database.url == "postgresql+psycopg://u@db/t"
    assert s.dicom.allowed_calling_aets == ["A", "B"]
    with pytest.raises(ConfigError, match=r"dicom\.colour"):
        load(cfg, environ={"TRIAGED_DICOM__COLOUR": "red"})
