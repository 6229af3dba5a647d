"""Files of NeFT's rank-shift analysis: per-candidate probe scores (rank 0 only).

`RUN/neft/<task>.before.safetensors` holds the scores the task's rows were selected
from, `<task>.after.safetensors` the same probe on the trained model, and
`<task>.rank_shift.json` their `ncft.analysis.neft_stats.weight_movement_rank_shift` (paths:
`ncft.run_paths.RunPaths.neft_scores` and `neft_shift`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ncft.io import atomic_file


def save_scores(path: Path, scores: dict[str, torch.Tensor]) -> None:
    """Write `group name -> 1-D scores` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in scores.items()}, str(tmp))


def load_scores(path: Path) -> dict[str, torch.Tensor]:
    """Read what `save_scores` wrote."""
    return load_file(str(path))
