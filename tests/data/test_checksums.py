"""The shipped data sets are byte-identical to what their SHA256SUMS record."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from launcher.spec import default_data_root

DATA = Path(__file__).resolve().parents[2] / "data"
SETS = ("cl_benchmark", "translation_en_es")


def _sums(folder: Path) -> dict[str, str]:
    out = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.lstrip("*")] = digest
    return out


@pytest.mark.parametrize("name", SETS)
def test_every_file_matches_its_checksum(name: str):
    folder = DATA / name
    sums = _sums(folder)
    listed = set(sums)
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert present - listed == {"SHA256SUMS"}, f"files without a checksum: {present - listed}"
    assert listed <= present, f"listed but missing: {listed - present}"
    for rel, digest in sums.items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest, rel


def test_shipped_data_is_the_default_root(monkeypatch):
    monkeypatch.delenv("NCFT_DATA_ROOT", raising=False)
    assert default_data_root() == DATA
