"""Cost of the neuron mask in a training step, on ZeRO-3, FSDP2 and FSDP1.

Both arms train the SAME matrices (`freeze_unselected` with the same NeuronSet, so
the engine allocates gradients and optimizer state for exactly gate/up/down of every
layer); they differ only in the masking itself:

* masked:   `train_step(engine, batches, plan)` with `optimizer.set_frozen(plan.tensor_masks)`
            (= `plan.apply_to_grads()` + the masked update in `MaskedAdamW`);
* unmasked: `train_step(engine, batches, None)` with `optimizer.set_frozen({})`.

Masked (A) and unmasked (B) steps alternate on one engine in one run, after
warm-up, in the order A B B A A B ... (each pair flips its order), so slow drift
from other load on the machine cancels. A step is timed on rank 0 from a
`dist.barrier()` to a `dist.barrier()` after the step, i.e. fwd + bwd + mask +
clip + optimizer step of the slowest rank. Each rank's CPU time of the step
(`time.process_time()`, barrier wait excluded) is recorded too and summed over
ranks: on a shared, oversubscribed machine it tracks the work done far better than
wall time does.

The pieces (`plan.apply_to_grads()` and every `MaskedAdamW.step()` call, which
ZeRO-3 makes once per sub-group) are timed in place during those same steps, on
every rank, with `time.perf_counter()` and with `time.thread_time()` (CPU time of
the calling thread, which other processes' load barely moves). Both pieces are
rank-local and issue no collective, so no barrier is needed inside (one there would
only perturb the full-step timing); the report gives rank 0's medians and the
slowest rank's wall medians.

Run (spawns the ranks itself; or run the same file under torchrun):

    OMP_NUM_THREADS=1 python benchmarks/mask_overhead.py --nproc 2 --out mask_overhead.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ENGINES = ("deepspeed", "fsdp2", "fsdp1")

# name -> (LlamaConfig kwargs, seq_len, micro_batch, warm-up steps, measured pairs)
CONFIGS: dict[str, dict] = {
    # Awkward sizes on purpose (d_ff 172 = 4 * 43): rows do not split evenly.
    "tiny": {
        "model": dict(
            vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4,
        ),
        "seq": 128, "micro_batch": 2, "warmup": 6, "pairs": 30,
    },
    # GPT-2-small-like Llama: ~110M parameters (tied embeddings), MLPs 57M of them.
    "100m": {
        "model": dict(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=12,
        ),
        "seq": 128, "micro_batch": 2, "warmup": 2, "pairs": 6,
    },
    # TinyLlama-1.1B's shape (GQA 32/4 heads): the GPU check's model (make gpu-check).
    "1b": {
        "model": dict(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4,
        ),
        "seq": 512, "micro_batch": 4, "warmup": 3, "pairs": 8,
    },
}
FRACTION = 0.05


def build_model(name: str, seed: int = 0, device: str = "cpu"):
    """A random-init Llama of config `name` (fp32), built directly on `device`.

    On a GPU the 1B model is initialised on the device: seconds instead of a minute of
    CPU initialisation.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **CONFIGS[name]["model"], max_position_embeddings=max(128, CONFIGS[name]["seq"]),
        tie_word_embeddings=True, mlp_bias=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="sdpa",
    )
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def random_neuron_set(model, fraction: float, seed: int = 0):
    """Random `fraction` of the neuron units of every layer (gate/up/down)."""
    import torch

    from ncft.arch import get_adapter
    from ncft.neuron_set import NeuronSet

    blocks = get_adapter(model).mlp_blocks(model)
    gen = torch.Generator().manual_seed(seed)
    units = {}
    for block in blocks:
        k = max(1, round(fraction * block.d_ff))
        units[block.layer] = torch.randperm(block.d_ff, generator=gen)[:k]
    return NeuronSet.from_units(blocks, units, meta={"fraction": fraction, "seed": seed})


def summary(xs: list[float]) -> dict:
    """Median, IQR and raw samples (seconds)."""
    if not xs:
        return {"median": None, "iqr": None, "n": 0, "samples": []}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "iqr": q3 - q1, "n": len(xs), "samples": xs}


class Timed:
    """Wrap a bound method; record each call's wall and calling-thread CPU seconds."""

    def __init__(self, fn) -> None:
        self.fn, self.wall, self.cpu = fn, 0.0, 0.0

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - t0
            self.cpu += time.thread_time() - c0

    def take(self) -> tuple[float, float]:
        """(wall, CPU) summed since the last take (ZeRO-3 steps once per sub-group)."""
        out, self.wall, self.cpu = (self.wall, self.cpu), 0.0, 0.0
        return out


CLOCKS = ("wall", "thread_cpu")


def pieces_summary(apply_s: list, opt_m: list, opt_u: list, step_u: float) -> dict:
    """Medians of the masking pieces and what they add to an unmasked step."""
    m_apply, m_opt_m, m_opt_u = (statistics.median(x) for x in (apply_s, opt_m, opt_u))
    return {
        "apply_to_grads_s": summary(apply_s),
        "opt_step_masked_s": summary(opt_m),
        "opt_step_unmasked_s": summary(opt_u),
        "opt_step_ratio": m_opt_m / m_opt_u,
        # apply_to_grads + (masked - unmasked optimizer step), over the unmasked step.
        "mask_cost_fraction": (m_apply + m_opt_m - m_opt_u) / step_u,
    }


def bench_one(backend: str, config: str, info, warmup: int, pairs: int,
              dtype: str = "float32") -> dict:
    import torch
    import torch.distributed as dist

    from launcher.engines import OptimConfig, build_engine
    from ncft.masks.install import freeze_unselected, install
    from ncft.train import train_step

    spec = CONFIGS[config]
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(info.device)
    model = build_model(config, device=str(info.device) if cuda else "cpu")
    params = sum(p.numel() for p in model.parameters())
    neuron_set = random_neuron_set(model, FRACTION)
    trainable = freeze_unselected(model, neuron_set.entries)
    names = set(trainable)
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in names)
    # The model stays fp32 (masters); `dtype` is the compute dtype (engines own it).
    cfg = OptimConfig(
        lr=1e-4, weight_decay=0.01, grad_clip=1.0, grad_accum=1,
        micro_batch_size=spec["micro_batch"], compute_dtype=getattr(torch, dtype),
    )
    engine = build_engine(backend, model, cfg, info)
    plan = install(engine, neuron_set.entries)
    selected_local = plan.num_trainable_local()

    apply_t = Timed(plan.apply_to_grads)
    plan.apply_to_grads = apply_t  # instance attribute shadows the method
    opt_t = Timed(engine.optimizer.step)
    engine.optimizer.step = opt_t  # DeepSpeed calls self.optimizer.step() per sub-group

    vocab = spec["model"]["vocab_size"]
    gen = torch.Generator().manual_seed(1234 + info.rank)

    def batch():
        ids = torch.randint(0, vocab, (spec["micro_batch"], spec["seq"]), generator=gen)
        ids = ids.to(info.device)
        return [{"input_ids": ids, "labels": ids}]

    def step(masked: bool) -> tuple[float, float, tuple, tuple]:
        engine.optimizer.set_frozen(plan.tensor_masks if masked else {})
        mbs = batch()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(engine, mbs, plan if masked else None)
        if cuda:  # kernels are asynchronous: the step ends when the device is done
            torch.cuda.synchronize(info.device)
        cpu = time.process_time() - c0  # this rank's CPU seconds, barrier wait excluded
        dist.barrier()
        return time.perf_counter() - t0, cpu, apply_t.take(), opt_t.take()

    for i in range(warmup):
        step(masked=i % 2 == 0)
    full, cpu = {True: [], False: []}, {True: [], False: []}
    # [clock][masked] -> per-step seconds, clock 0 = wall, 1 = thread CPU
    apply_s = [[], []]
    opt = [{True: [], False: []}, {True: [], False: []}]
    pair_ratios = []
    for i in range(pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {}
        for masked in order:
            t, c, a, o = step(masked)
            got[masked] = t
            full[masked].append(t)
            cpu[masked].append(c)
            for clock in (0, 1):
                opt[clock][masked].append(o[clock])
                if masked:
                    apply_s[clock].append(a[clock])
        pair_ratios.append(got[True] / got[False])
    # CPU seconds of a step summed over ranks: the work done, much less sensitive than
    # wall time to other processes competing for the cores.
    # Collectives on the rank's device: NCCL rejects CPU tensors.
    cpu_local = torch.tensor([cpu[True], cpu[False]], dtype=torch.float64, device=info.device)
    cpu_all = [torch.zeros_like(cpu_local) for _ in range(info.world_size)]
    dist.all_gather(cpu_all, cpu_local)
    cpu_sum = torch.stack(cpu_all).sum(0).cpu()
    cpu_masked, cpu_unmasked = cpu_sum[0].tolist(), cpu_sum[1].tolist()

    # Per-rank wall piece medians -> the slowest rank.
    local = torch.tensor(
        [
            statistics.median(apply_s[0]), statistics.median(opt[0][True]),
            statistics.median(opt[0][False]), float(selected_local),
        ],
        dtype=torch.float64, device=info.device,
    )
    gathered = [torch.zeros_like(local) for _ in range(info.world_size)]
    dist.all_gather(gathered, local)
    peak = torch.cuda.max_memory_allocated(info.device) if cuda else None
    engine.close()
    gc.collect()
    if info.rank != 0:
        return {}
    per_rank = torch.stack(gathered).cpu()
    ratio = statistics.median(full[True]) / statistics.median(full[False])
    step_u, cpu_u = statistics.median(full[False]), statistics.median(cpu_unmasked)
    return {
        "engine": backend, "config": config, "world_size": info.world_size, "dtype": dtype,
        "params": params, "trainable_params": n_trainable,
        "selected_params": int(per_rank[:, 3].sum()),
        "seq": spec["seq"], "micro_batch": spec["micro_batch"],
        "warmup_steps": warmup, "pairs": pairs,
        "step_unmasked_s": summary(full[False]), "step_masked_s": summary(full[True]),
        "median_unmasked_s": statistics.median(full[False]),
        "median_masked_s": statistics.median(full[True]),
        "ratio": ratio,
        "paired_ratio": summary(pair_ratios),
        "cpu_unmasked_s": summary(cpu_unmasked), "cpu_masked_s": summary(cpu_masked),
        "cpu_ratio": statistics.median(cpu_masked) / statistics.median(cpu_unmasked),
        # Rank 0's pieces. Wall overhead is over the wall step; thread-CPU overhead
        # over this rank's share of the step's CPU time (summed CPU / world size).
        "pieces_rank0": {
            "wall": pieces_summary(apply_s[0], opt[0][True], opt[0][False], step_u),
            "thread_cpu": pieces_summary(
                apply_s[1], opt[1][True], opt[1][False], cpu_u / info.world_size
            ),
        },
        "device": torch.cuda.get_device_name(info.device) if cuda else "cpu",
        # Rank 0's peak device memory over model build, engine build and all steps.
        "peak_device_memory_bytes": peak,
        "pieces_wall_max_over_ranks": {
            "apply_to_grads_s": float(per_rank[:, 0].max()),
            "opt_step_masked_s": float(per_rank[:, 1].max()),
            "opt_step_unmasked_s": float(per_rank[:, 2].max()),
        },
    }


def table(results: list[dict]) -> str:
    """Markdown table of the medians (rank 0's pieces, wall clock then thread CPU)."""
    head = [
        "engine", "config", "foreach", "params", "median unmasked (s)", "median masked (s)",
        "ratio",
        "paired ratio (IQR)", "CPU-time ratio", "apply_to_grads (ms)",
        "opt.step masked / unmasked (ms)", "pieces overhead", "same, thread CPU",
    ]
    rows = []
    for r in results:
        p, c, pr = r["pieces_rank0"]["wall"], r["pieces_rank0"]["thread_cpu"], r["paired_ratio"]
        rows.append([
            r["engine"], r["config"], str(r.get("foreach_moments", True)), f"{r['params']:,}",
            f"{r['median_unmasked_s']:.4f}",
            f"{r['median_masked_s']:.4f}", f"{r['ratio']:.3f}",
            f"{pr['median']:.3f} ({pr['iqr']:.3f})", f"{r['cpu_ratio']:.3f}",
            f"{p['apply_to_grads_s']['median'] * 1e3:.2f}",
            f"{p['opt_step_masked_s']['median'] * 1e3:.2f} / "
            f"{p['opt_step_unmasked_s']['median'] * 1e3:.2f}",
            f"{p['mask_cost_fraction'] * 100:+.1f}%", f"{c['mask_cost_fraction'] * 100:+.1f}%",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [
        "| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                          enumerate(zip(r, widths))) + " |"
        for r in rows
    ]
    return "\n".join(lines)


def worker(args: argparse.Namespace) -> None:
    import warnings

    import torch

    # torch's c10d wrappers warn on every DeepSpeed/FSDP1 collective call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from launcher.dist import init_distributed, shutdown
    from ncft.masks.optim import MaskedAdamW

    info = init_distributed()
    results = []
    for config in args.configs.split(","):
        spec = CONFIGS[config]
        warmup = spec["warmup"] if args.warmup is None else args.warmup
        pairs = spec["pairs"] if args.pairs is None else args.pairs
        for backend in args.engines.split(","):
            for foreach in (False, True) if args.compare_foreach else (True,):
                MaskedAdamW.foreach_moments = foreach
                t0 = time.perf_counter()
                r = bench_one(backend, config, info, warmup, pairs, args.dtype)
                if info.rank == 0:
                    r["wall_s"] = time.perf_counter() - t0
                    r["foreach_moments"] = foreach
                    results.append(r)
                    print(
                        f"[mask_overhead] {backend}/{config} foreach={foreach}: unmasked "
                        f"{r['median_unmasked_s']:.4f}s masked {r['median_masked_s']:.4f}s "
                        f"ratio {r['ratio']:.3f} ({r['wall_s']:.0f}s)", flush=True,
                    )
    if info.rank == 0:
        report = {
            "benchmark": "mask_overhead",
            "command": args.command,
            "machine": {
                "platform": platform.platform(), "python": platform.python_version(),
                "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            },
            "world_size": info.world_size, "fraction": FRACTION,
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(table(results), flush=True)
        print(f"[mask_overhead] wrote {args.out}", flush=True)
    shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report path")
    parser.add_argument("--configs", default="tiny,100m", help=f"of {sorted(CONFIGS)}")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--nproc", type=int, default=2, help="ranks (ignored under torchrun)")
    parser.add_argument("--warmup", type=int, default=None, help="override per-config warm-up")
    parser.add_argument("--pairs", type=int, default=None, help="override per-config pairs")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (masters and moments stay fp32)")
    parser.add_argument("--compare-foreach", action="store_true",
                        help="each engine twice: moments per tensor (before #21), then "
                             "with one foreach call per operation (MaskedAdamW's default)")
    args = parser.parse_args(argv)
    for c in args.configs.split(","):
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {sorted(CONFIGS)}")
    for e in args.engines.split(","):
        if e not in ENGINES:
            parser.error(f"unknown engine {e!r}; choose from {list(ENGINES)}")
    args.command = " ".join([os.path.basename(sys.executable), *sys.argv])
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any worker imports torch
    from launcher.run.spawn import run_local

    run_local(worker, args.nproc, args)


if __name__ == "__main__":
    main()
