"""Atomic writes: nothing half-written is ever visible, and what is published is readable like a plain write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flywheel.data.io import atomic_dir, read_jsonl, write_json, write_jsonl


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_published_files_and_folders_get_umask_permissions_not_the_temp_files_private_ones(tmp_path, umask_022):
    write_json(tmp_path / "report.json", {"a": 1})
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    with atomic_dir(tmp_path / "checkpoint") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
    assert _mode(tmp_path / "report.json") == 0o644  # mkstemp alone would leave 0600
    assert _mode(tmp_path / "rows.jsonl") == 0o644
    assert _mode(tmp_path / "checkpoint") == 0o755  # mkdtemp alone would leave 0700


def test_a_failed_atomic_dir_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "checkpoint") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []


def test_write_jsonl_round_trips_and_leaves_no_temp_file(tmp_path):
    rows = [{"text": "ü", "n": 1}, {"text": "b", "n": 2}]
    assert write_jsonl(tmp_path / "x.jsonl", rows) == 2
    assert read_jsonl(tmp_path / "x.jsonl") == rows
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]
