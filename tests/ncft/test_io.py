"""Atomic writes: the target is the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os

import pytest

from ncft.io import atomic_dir, atomic_file, write_json, write_text


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "results.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"], "temp removed"
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_files_get_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        assert write_text(tmp_path / "results.json", "{}").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_write_json_format(tmp_path):
    path = write_json(tmp_path / "state.json", {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2)


def test_atomic_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "final"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("2")
        raise RuntimeError("crash mid-export")
    assert (target / "config.json").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"], "no temp dirs left"
