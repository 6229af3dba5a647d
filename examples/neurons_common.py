"""Pieces the two library examples share (hf_trainer_neurons.py, accelerate_neurons.py).

Training data: the first `rows` SST-2 rows shipped in data/cl_benchmark/sst2, written
as "text Answer: label" lines to OUT/train.txt and cut into fixed-length token blocks
(`ncft.data.text.token_blocks`), laid out in the order `ncft masked-train` trains on
(`ncft.data.text.lm_order`). With a sequential sampler the run is therefore comparable,
step for step, to `ncft masked-train --data OUT/train.txt` with the same settings;
in your own script, shuffle as usual.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import ncft
from ncft.data.examples import collate, encode, read_jsonl
from ncft.data.text import lm_order, token_blocks

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "cl_benchmark" / "sst2" / "train.jsonl"
PROBE = "Text: a gorgeous , witty , seductive movie . Answer:"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments both examples take (the defaults train the default model)."""
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="HF directory or hub id, or a built-in name "
                             "(smollm2-135m-instruct, tiny-random-llama)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--neurons", type=Path, help="NeuronSet file (.safetensors); "
                        "without it, ncft.score selects on the SST-2 rows")
    parser.add_argument("--fraction", type=float, default=0.05,
                        help="units per layer that ncft.score selects")
    parser.add_argument("--rows", type=int, default=256, help="SST-2 rows to train on")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (GPU)")


def model_dir(name: str) -> str:
    """A local directory for a built-in model name (converted once), else `name`."""
    from launcher.run.models import resolve_model  # the repo's model cache

    return resolve_model(name)


def sst2_rows(rows: int) -> list[dict]:
    """The first `rows` shipped SST-2 training rows."""
    return read_jsonl(SST2, limit=rows)


def train_text(out: Path, rows: int) -> Path:
    """Write the SST-2 rows as "text Answer: label" lines to OUT/train.txt."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{r['text'].strip()} Answer: {r['label']}" for r in sst2_rows(rows)]
    path = out / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class LmRows(torch.utils.data.Dataset):
    """Token blocks in `ncft masked-train`'s global order, as causal-LM examples."""

    def __init__(self, text: Path, tokenizer, seq_len: int, steps: int, global_micro: int,
                 seed: int) -> None:
        blocks = token_blocks(text, tokenizer, seq_len)
        self.rows = blocks[lm_order(blocks.shape[0], steps * global_micro, seed)]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def score_loader(tokenizer, rows: int, rank: int, world: int, batch_size: int = 8):
    """This rank's share of the SST-2 rows as prompt/answer batches for `ncft.score`."""
    from ncft.data.examples import Example

    examples = [Example(f"{r['text'].strip()} Answer:", r["label"]) for r in sst2_rows(rows)]
    encoded = encode(examples, tokenizer, max_length=64)[rank::world]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [collate(encoded[i : i + batch_size], pad)
            for i in range(0, len(encoded), batch_size)]


def grad_opt_bytes(trainable: list[torch.Tensor], optimizer_state: dict,
                   local_numel) -> tuple[int, int]:
    """(gradient, optimizer-state) bytes this rank holds.

    Counted as benchmarks/sparse_delta.py does: fp32 gradients of the trainable
    elements it owns, plus the real sizes of the optimizer's state tensors.
    """
    grad = 4 * sum(local_numel(p) for p in trainable)
    opt = 0
    for state in optimizer_state.values():
        for value in state.values():
            if hasattr(value, "numel"):
                local = value.to_local() if hasattr(value, "to_local") else value
                opt += local.numel() * local.element_size()
    return grad, opt


def write_report(out: Path, rank: int, world: int, engine: str, grad_opt: tuple[int, int],
                 full: int, selected: int, total: int, **extra) -> None:
    """Print and write this rank's memory line (OUT/memory_rank{r}.json), with `extra`."""
    measured = sum(grad_opt)
    report = {"engine": engine, "rank": rank, "world_size": world, **extra,
              "grad_bytes": grad_opt[0], "opt_bytes": grad_opt[1],
              "grad_opt_bytes": measured, "full_ft_grad_opt_bytes": full,
              "selected_fraction": selected / total, "ratio_to_full": measured / full}
    (out / f"memory_rank{rank}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[rank {rank}] {engine}: gradient + optimizer state {measured / 2**20:.3f} MiB, "
          f"full fine-tuning would hold {full / 2**20:.1f} MiB ({measured / full:.4f} of it; "
          f"selected fraction {selected / total:.4f})", flush=True)


def selected_numel(neurons: ncft.NeuronSet, shapes: dict[str, tuple[int, ...]]) -> int:
    """Elements the NeuronSet selects."""
    total = 0
    for fqn, sel in neurons.entries.items():
        shape = shapes[fqn]
        total += len(sel) * math.prod(s for i, s in enumerate(shape) if i != sel.axis)
    return total
