"""Cost of neuron scoring: attribution time vs a training step, NeFT memory vs a layer.

1. Time. On one batch of B examples (random tokens, the last A of each sequence are
   the answer), compare
   * train:  `engine.forward(batch)` + `engine.backward(loss)` (parameter grads;
     an untimed `engine.step()` follows, so every engine drops them its own way), and
   * score:  `GradAttribution(...).score(engine, groups)` on the same B examples in
     one batch (collate, hooks, forward, `autograd.grad` to the activations,
     `|a * g|` sums, all-reduce).
   The two alternate A B B A ... after warm-up, so drift from other load cancels;
   the ratio of medians is reported (goal: <= 1.3).
2. NeFT memory. `WeightCosine(LocalSnapshot).score(engine, groups)` over every
   projection's rows runs under a dispatch mode that tracks the bytes of every
   tensor created while it runs (live until its storage is freed); its peak is the
   scoring's extra memory, compared with one decoder layer's parameter bytes. The
   snapshot itself (one clone of the local trainable shards) is reported
   separately, as is the number of `engine.gathered` calls (must be 0).

Run (spawns ranks itself with --nproc > 1; or run the same file under torchrun):

    OMP_NUM_THREADS=1 python benchmarks/scoring_cost.py --config tiny
    OMP_NUM_THREADS=1 python benchmarks/scoring_cost.py --config 100m
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> LlamaConfig kwargs, batch, seq_len, answer tokens, warm-up, measured pairs
CONFIGS: dict[str, dict] = {
    "tiny": {
        "model": dict(vocab_size=256, hidden_size=64, intermediate_size=172,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
        "batch": 8, "seq": 128, "answer": 4, "warmup": 3, "pairs": 20,
    },
    # GPT-2-small-like Llama (~110M parameters), as in benchmarks/mask_overhead.py.
    "100m": {
        "model": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
        "batch": 4, "seq": 128, "answer": 4, "warmup": 1, "pairs": 5,
    },
}


class PeakBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (freed when collected)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and not a.is_meta}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                if storage.data_ptr() in inputs:  # a view or an in-place result: not new
                    continue
                key = id(storage)
                if key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def _encoded(cfg: dict, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    vocab, seq, answer = cfg["model"]["vocab_size"], cfg["seq"], cfg["answer"]
    out = []
    for _ in range(cfg["batch"]):
        ids = torch.randint(3, vocab, (seq,), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[-answer:] = ids[-answer:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _timed(fn) -> float:
    _barrier()
    start = time.perf_counter()
    fn()
    _barrier()
    return time.perf_counter() - start


def time_ratio(engine, model, blocks, groups, encoded, cfg: dict, info) -> dict:
    from ncft.data.examples import batches, collate
    from ncft.scoring.attribution import GradAttribution

    share = next(batches(encoded, len(encoded) // info.world_size, info.rank,
                         info.world_size, "pad"))
    batch = collate(share, pad_id=0)
    scorer = GradAttribution(encoded, blocks, batch_size=len(share))

    def train():
        engine.backward(engine.forward(batch).loss)

    def score():
        scorer.score(engine, groups)

    arms = {"train": train, "score": score}
    times: dict[str, list[float]] = {"train": [], "score": []}
    for i in range(cfg["warmup"] + cfg["pairs"]):
        order = ("train", "score") if i % 2 == 0 else ("score", "train")
        for name in order:
            seconds = _timed(arms[name])
            if name == "train":
                engine.step()  # untimed: every engine's way to consume and drop the grads
            if i >= cfg["warmup"]:
                times[name].append(seconds)
    train_s, score_s = statistics.median(times["train"]), statistics.median(times["score"])
    return {"train_fwd_bwd_s": train_s, "score_s": score_s, "ratio": score_s / train_s,
            "samples": len(times["train"])}


def neft_memory(engine, model) -> dict:
    from ncft.scoring.cosine import LocalSnapshot, WeightCosine
    from ncft.scoring.groups import row_groups

    groups = row_groups(model, ["gate", "up", "down", "fc_in", "fc_out", "attention"])
    gathers = []
    original = engine.gathered
    engine.gathered = lambda fqns: (gathers.append(len(fqns)), original(fqns))[1]
    snapshot = LocalSnapshot.take(engine)
    tracker = PeakBytes()
    with torch.no_grad(), tracker:
        WeightCosine(snapshot).score(engine, groups)
    del engine.gathered
    layer0 = [n for n, _ in engine.named_parameter_shapes() if ".layers.0." in n]
    shapes = dict(engine.named_parameter_shapes())
    itemsize = next(model.parameters()).element_size()
    layer_bytes = sum(torch.Size(shapes[n]).numel() for n in layer0) * itemsize
    model_bytes = sum(torch.Size(s).numel() for s in shapes.values()) * itemsize
    return {
        "scoring_peak_extra_bytes": tracker.peak, "one_layer_bytes": layer_bytes,
        "peak_over_layer": tracker.peak / layer_bytes, "snapshot_local_bytes": snapshot.nbytes,
        "model_bytes": model_bytes, "gather_calls": len(gathers),
    }


def run(args: argparse.Namespace) -> None:
    """One rank's benchmark (every rank, or via `launcher.run.spawn.run_local`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.dist import init_distributed, print0, shutdown
    from launcher.engines import OptimConfig, build_engine
    from ncft.arch import get_adapter
    from ncft.scoring.groups import unit_groups

    torch.set_num_threads(args.threads)
    info = init_distributed()
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg["model"], tie_word_embeddings=False))
    blocks = get_adapter(model).mlp_blocks(model)
    groups = unit_groups(blocks)
    micro = cfg["batch"] // info.world_size
    engine = build_engine(args.backend, model, OptimConfig(micro_batch_size=micro), info)
    encoded = _encoded(cfg)
    report = {"config": args.config, "backend": args.backend, "world_size": info.world_size,
              "threads": args.threads, "batch": cfg["batch"], "seq": cfg["seq"],
              "params": sum(torch.Size(s).numel() for _, s in engine.named_parameter_shapes()),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    report["time"] = time_ratio(engine, model, blocks, groups, encoded, cfg, info)
    report["neft_memory"] = neft_memory(engine, model)
    t, m = report["time"], report["neft_memory"]
    print0(json.dumps(report, indent=2))
    print0(f"scoring / training fwd+bwd = {t['ratio']:.2f} (goal <= 1.3); NeFT scoring peak "
           f"extra = {m['peak_over_layer']:.2f} x one layer, {m['gather_calls']} gathers; "
           f"snapshot = {m['snapshot_local_bytes'] / m['model_bytes']:.2f} x model")
    if args.out and info.is_main_process:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    engine.close()
    shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--backend", default="single")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", help="write the report JSON here (rank 0)")
    args = parser.parse_args()
    from launcher.run.spawn import run_local

    run_local(run, args.nproc, args)


if __name__ == "__main__":
    main()
