"""How `ncft plan` scales: plan time and mask bookkeeping per rank at 8-1024 ranks.

For Llama-2-7b (the shipped config, meta device, bf16 compute with fp32 masters) and
a 10% NeuronSet (10% of the FFN units of every layer, gate/up/down), on every
sharded engine and at world sizes 8, 64, 512 and 1024, report for rank 0:

- the planner's parameter bytes (every copy of the weights the rank holds) and mask
  bookkeeping bytes (what `RankMasks` allocates, `ncft.masks.structured`: int16
  positions of the selected rows per segment and of the selected columns per
  parameter, a bool per element only for segments under 4096 elements), and their
  ratio (issue #9's goal: <= 1%);
- the same bookkeeping counted exactly for a real random 10% NeuronSet
  (`selections=`: the masks built on the meta device by `RankMasks`'s code);
- the NeuronSet itself (int64 indices, whole on every rank, host memory), which the
  planner's `masks` term adds, and the ratio with it;
- the seconds each plan took (goal: seconds), after the one-off model build.

No weights are loaded and no process group is needed: this is the arithmetic of
`launcher/plan/memory.py`, whose numbers tests/launcher/plan/test_real_alloc.py
checks byte for byte against real allocations at small scale.

    OMP_NUM_THREADS=1 python benchmarks/plan_scale.py [--out plan_scale.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.plan.memory import Batch, DsTuning, neuronset_bytes, per_rank_bytes  # noqa: E402
from launcher.plan.model import describe, meta_model, resolve_config, with_trainable  # noqa: E402
from ncft.arch import get_adapter  # noqa: E402
from ncft.scoring.groups import unit_groups
from ncft.selection import to_neuron_set, top_k  # noqa: E402

WORLDS = (8, 64, 512, 1024)
ENGINES = ("deepspeed", "fsdp2", "fsdp1")
FRACTION = 0.10
BATCH = Batch(micro_batch=4, seq_len=512)


def random_set(meta):
    """A real 10%-per-layer NeuronSet from seeded random scores (no weights needed)."""
    groups = unit_groups(get_adapter(meta).mlp_blocks(meta), ("gate", "up", "down"))
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.size, generator=gen) for g in groups}
    return to_neuron_set(top_k(scores, groups, fraction=FRACTION), groups, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-2-7b-hf")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    config, source = resolve_config(args.model)
    meta = meta_model(config)
    base = describe(meta, source)
    nset = random_set(meta)
    shapes = dict(meta.named_parameters())
    fractions = {fqn: (sel.indices.numel() / shapes[fqn].shape[sel.axis], sel.axis)
                 for fqn, sel in nset.entries.items()}
    setup_s = time.perf_counter() - started
    ds = DsTuning(persistence_threshold=100_000, reduce_bucket_size=50_000_000)
    rows = []
    for engine in ENGINES:
        stage = with_trainable(base, fractions, fsdp1_units=engine == "fsdp1")
        for world in WORLDS:
            t0 = time.perf_counter()
            plan = per_rank_bytes(engine, stage, "bfloat16", world, BATCH, False, ds=ds)
            plan_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            exact = per_rank_bytes(engine, stage, "bfloat16", world, BATCH, False, ds=ds,
                                   selections=nset.entries)
            exact_s = time.perf_counter() - t0
            nbytes = neuronset_bytes(stage)
            params = plan["parameters"]
            rows.append({
                "engine": engine, "world_size": world, "parameters": int(params),
                "masks": int(plan["masks"] - nbytes),
                "masks_exact": int(exact["masks"] - nbytes), "neuron_set": int(nbytes),
                "ratio": (plan["masks"] - nbytes) / params,
                "ratio_exact": (exact["masks"] - nbytes) / params,
                "ratio_with_set": exact["masks"] / params,
                "plan_s": plan_s, "plan_exact_s": exact_s,
            })
    report = {"model": source, "fraction": FRACTION, "setup_s": setup_s, "rows": rows}
    print(f"model {source}, 10% NeuronSet, bf16 + fp32 masters; setup (config, meta "
          f"model, NeuronSet) {setup_s:.2f} s")
    print("| engine | ranks | parameters / rank | masks / rank (expected) | masks / params "
          "| masks (real set) | masks / params (real set) | NeuronSet | masks + set / params "
          "| plan s | plan s (real set) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['world_size']} | {r['parameters'] / 2**20:,.1f} MiB "
              f"| {r['masks'] / 2**10:,.1f} KiB | {r['ratio']:.3%} "
              f"| {r['masks_exact'] / 2**10:,.1f} KiB | {r['ratio_exact']:.3%} "
              f"| {r['neuron_set'] / 2**10:,.1f} KiB | {r['ratio_with_set']:.2%} "
              f"| {r['plan_s']:.3f} | {r['plan_exact_s']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
