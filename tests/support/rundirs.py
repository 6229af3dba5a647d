"""Compare run directories written by `ncft run` (results, per-step losses, weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def losses(run: Path) -> list[tuple[int, int, float]]:
    """Every logged training step of `run` as (stage, step, loss), in log order."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in lines]


def assert_same_run(run: Path, ref: Path) -> None:
    """Assert that a resumed `run` ended exactly where the uninterrupted `ref` did: the
    same results matrix, the same losses at every step and bit-identical final weights
    (same engine, world size and data order, so nothing may differ by rounding)."""
    got, want = (json.loads((r / "results.json").read_text()) for r in (run, ref))
    assert got["matrix"] == want["matrix"]
    assert losses(run) == losses(ref)
    a, b = (load_file(r / "final" / "model.safetensors") for r in (run, ref))
    for name in b:
        assert torch.equal(a[name], b[name]), name
