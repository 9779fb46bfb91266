"""The one atomic-write helper: the target is the old file or the new one, never a part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from triaged.atomic import atomic_path, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "live.json"
    write_atomic(target, '{"version": "v1"}')
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"vers')
        raise RuntimeError("crash while writing")
    assert target.read_text() == '{"version": "v1"}'
    assert [p.name for p in tmp_path.iterdir()] == ["live.json"]


def test_writers_that_pick_a_format_by_name_write_that_format(tmp_path: Path) -> None:
    target = tmp_path / "slice.npy"
    with atomic_path(target, durable=False) as tmp:
        np.save(tmp, np.arange(3.0))  # numpy would append ".npy" to another suffix
    assert np.array_equal(np.load(target), np.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["slice.npy"]
    write_atomic(tmp_path / "labels.json", "{}", mode=0o600)
    assert (tmp_path / "labels.json").stat().st_mode & 0o777 == 0o600
