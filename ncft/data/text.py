"""Plain text to fixed-length token blocks, split across data-parallel ranks.

Every block has the same length and no padding, so each rank's mean token loss
averaged over ranks equals the global mean: the same global batch gives the same
gradient on any world size (what the parity tests rely on).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch


def token_blocks(path: str | Path, tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize a text file and cut it into `[num_blocks, seq_len]` blocks.

    Args:
        path: UTF-8 text file.
        tokenizer: A HF tokenizer (anything with `__call__` returning `input_ids`).
        seq_len: Tokens per block; the tail shorter than a block is dropped.

    Raises:
        ValueError: If the file is missing or too short for one block.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: text file {path} does not exist")
    ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise ValueError(
            f"data: {path} has {len(ids)} tokens, fewer than one block of seq_len={seq_len}"
        )
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


def rank_slice(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous share of a global batch (its size must divide evenly)."""
    if rows.shape[0] % world_size:
        raise ValueError(
            f"global batch of {rows.shape[0]} rows does not split over {world_size} ranks"
        )
    per_rank = rows.shape[0] // world_size
    return rows[rank * per_rank : (rank + 1) * per_rank]


def lm_steps(
    blocks: torch.Tensor,
    num_steps: int,
    micro_batch_size: int,
    grad_accum: int,
    rank: int,
    world_size: int,
    seed: int,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Causal-LM micro-batches for `num_steps` optimizer steps on this rank.

    The global order of blocks depends only on `seed`, never on the world size:
    step s, micro-batch m takes the next `micro_batch_size * world_size` blocks of
    a seeded permutation (cycled), and each rank takes its contiguous share.
    """
    global_micro = micro_batch_size * world_size
    order = lm_order(blocks.shape[0], num_steps * grad_accum * global_micro, seed)
    for step in range(num_steps):
        micro_batches = []
        for m in range(grad_accum):
            start = (step * grad_accum + m) * global_micro
            ids = rank_slice(blocks[order[start : start + global_micro]], rank, world_size)
            micro_batches.append({"input_ids": ids, "labels": ids})
        yield micro_batches


def lm_order(num_blocks: int, num_rows: int, seed: int) -> torch.Tensor:
    """The global sequence of block indices `lm_steps` trains on, `num_rows` long.

    A seeded permutation of the blocks, cycled.
    Global micro-batch `b` is rows `[b G, (b + 1) G)` (`G = micro_batch_size *
    world_size`), each rank taking its contiguous share: so a sequential sampler
    whose batches are dealt to ranks in turn (accelerate's sharded loaders, HF
    `Trainer`) sees exactly `lm_steps`' batches.
    """
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    return order[torch.arange(num_rows) % num_blocks]
