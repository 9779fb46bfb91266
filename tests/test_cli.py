"""The command line: help everywhere, user mistakes as one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from triaged.cli import build_parser

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triaged.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_top_level_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("serve", "worklist", "db", "demo"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help(cmd: str) -> None:
    out = run(cmd, "--help")
    assert out.returncode == 0
    assert "usage: triaged" in out.stdout


@pytest.mark.parametrize(
    "args",
    [["bogus"], ["worklist", "--config", "/no/such/file.toml"], ["worklist", "--limit", "x"]],
)
def test_user_mistakes_are_one_line_exit_2(args: list[str]) -> None:
    out = run(*args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[database]\nurl = "postgresql+psycopg://nobody@127.0.0.1:1/none"\n')
    out = run("worklist", "--config", str(cfg))
    assert out.returncode == 2
    assert "database not reachable" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_db_upgrade_and_worklist_json(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[database]\nurl = "sqlite:///w.db"\n')
    up = run("db", "upgrade", "--config", str(cfg))
    from triaged.worklist.db import head_revision

    assert up.returncode == 0 and f"revision {head_revision()}" in up.stdout
    assert (tmp_path / "w.db").is_file()
    wl = run("worklist", "--json", "--config", str(cfg))
    assert wl.returncode == 0 and wl.stdout.strip() == "[]"
