"""Sparse-delta vs masked vs full fine-tuning vs LoRA: step time, memory, state bytes.

Four arms train the same random-init Llama on the same batches, 2 CPU ranks, on
ZeRO-3 and FSDP2:

* full:         every parameter trains (no masks);
* masked:       `training.update: masked`, 5% of the FFN units of every layer
                (`freeze_unselected` + `ncft.masks.install.install`);
* sparse_delta: `training.update: sparse_delta`, the same units (`ncft.sparse_delta`);
* lora:         peft LoRA on gate/up/down with the rank that matches sparse_delta's
                trainable elements (r = 0.05 h d_ff / (h + d_ff), rounded).

The model is saved once as fp32 safetensors and each rank builds it on the meta device
and reads only its shard, as `ncft run` does (`launcher.engines.loading`); LoRA, like
`ncft run`'s LoRA methods, loads the whole model. `--whole` builds the whole model on
every rank instead (how this benchmark measured before sharded loading).

Every arm runs in its own freshly spawned ranks, so each rank's peak resident memory
is its own: after imports and process-group start the peak is reset
(`/proc/self/clear_refs` 5) and the arm reports `VmHWM - VmRSS at reset` per rank
(its model, engine, state and activations). Step time: a `dist.barrier()` to
`dist.barrier()` wall time on rank 0 over the measured steps after warm-up, median.
Gradient + optimizer bytes, per rank: gradient elements this rank stores for its
trainable segments (`engine.segments()`, fp32) plus the AdamW state tensors its
optimizer holds (their real sizes). Ratios are taken within one run of this script.

Run:

    OMP_NUM_THREADS=1 python benchmarks/sparse_delta.py --out sparse_delta.json

On one GPU (`--gpu`, config `1b`: TinyLlama-1.1B's shape, fp32, single engine) the
arms run one after another in one process and peak memory is
`torch.cuda.max_memory_allocated()` after a reset, per arm:

    python benchmarks/sparse_delta.py --gpu --configs 1b --out sparse_delta_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.mask_overhead import random_neuron_set

ENGINES = ("deepspeed", "fsdp2")
ARMS = ("full", "masked", "sparse_delta", "lora")
FRACTION = 0.05
# name -> (LlamaConfig kwargs, seq_len, micro_batch, warm-up steps, measured steps)
CONFIGS: dict[str, dict] = {
    "7m": {"model": dict(vocab_size=8000, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
           "seq": 128, "micro_batch": 2, "warmup": 2, "steps": 8},
    "30m": {"model": dict(vocab_size=16000, hidden_size=512, intermediate_size=1376,
                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
            "seq": 128, "micro_batch": 2, "warmup": 2, "steps": 6},
    # GPT-2-small-like Llama: ~110M parameters (tied embeddings), as in mask_overhead.
    "100m": {"model": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                           num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=12),
             "seq": 128, "micro_batch": 2, "warmup": 2, "steps": 5},
    # TinyLlama-1.1B's shape (GQA 32/4 heads), for --gpu.
    "1b": {"model": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
           "seq": 512, "micro_batch": 4, "warmup": 3, "steps": 10},
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Reset this process's VmHWM to its current RSS; return that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def build(config: str, device: str = "cpu"):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(llama_config(config))


def llama_config(config: str):
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIGS[config]["model"],
                      max_position_embeddings=max(128, CONFIGS[config]["seq"]),
                      tie_word_embeddings=True, mlp_bias=False, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")


def saved_weights(config: str, root: Path) -> Path:
    """`build(config)` saved once as a HF directory (fp32 safetensors) under `root`."""
    path = root / f"weights-{config}"
    if not (path / "config.json").is_file():
        build(config).save_pretrained(path)
    return path


def prepare_sharded(arm: str, config: str, path: Path):
    """As `prepare`, but the way `ncft run` loads: a meta model and the files to fill it.

    Returns (model, neuron set or None, weights or None). LoRA keeps the whole-model
    load, as `ncft run` does for its methods (peft wraps modules after loading).
    """
    import torch
    from transformers import LlamaForCausalLM

    from launcher.engines.weights import SafetensorsWeights
    from launcher.run.delta_weights import DeltaWeights
    from ncft import sparse_delta
    from ncft.masks.install import freeze_unselected

    if arm == "lora":
        model, nset = prepare(arm, config)
        return model, nset, None
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(config))
    nset = random_neuron_set(model, FRACTION)
    weights = SafetensorsWeights.from_path(path)
    if arm == "masked":
        freeze_unselected(model, nset.entries)
    elif arm == "sparse_delta":
        weights = DeltaWeights(weights, sparse_delta.install(model, nset.entries))
    return model, (nset if arm == "masked" else None), weights


def lora_rank(config: str) -> int:
    """LoRA rank on gate/up/down whose adapters hold as many elements as 5% of units."""
    m = CONFIGS[config]["model"]
    h, f = m["hidden_size"], m["intermediate_size"]
    units = max(1, round(FRACTION * f))
    return max(1, round(units * h / (h + f)))


def prepare(arm: str, config: str, device: str = "cpu"):
    """The model with this arm's trainables marked; (model, neuron set or None)."""
    from ncft import sparse_delta
    from ncft.lora import apply_lora
    from ncft.masks.install import freeze_unselected

    model = build(config, device)
    nset = random_neuron_set(model, FRACTION)
    if arm == "masked":
        freeze_unselected(model, nset.entries)
    elif arm == "sparse_delta":
        sparse_delta.install(model, nset.entries)
    elif arm == "lora":
        model = apply_lora(model, lora_rank(config), 16.0, 0.0,
                           ["gate_proj", "up_proj", "down_proj"], seed=0)
    return model, (nset if arm == "masked" else None)


def state_bytes(engine) -> tuple[int, int]:
    """(gradient bytes, optimizer-state bytes) this rank holds for training."""
    grad = 4 * sum(seg.numel for seg in engine.segments())
    opt = 0
    for state in engine.optimizer.state.values():
        for value in state.values():
            if hasattr(value, "numel"):
                local = value.to_local() if hasattr(value, "to_local") else value
                opt += local.numel() * local.element_size()
    return grad, opt


def worker(args: argparse.Namespace, arm: str, config: str, engine_name: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    torch.set_num_threads(1)
    from launcher.dist import init_distributed, shutdown
    from launcher.engines import OptimConfig, build_engine
    from ncft.masks.install import install
    from ncft.train import train_step

    info = init_distributed()
    spec = CONFIGS[config]
    base_rss = reset_peak()
    base_file = _status_kib("RssFile") * 1024
    weights = None
    if args.sharded:
        path = saved_weights(config, Path(args.tmp) / "weights")  # written by main
        model, nset, weights = prepare_sharded(arm, config, path)
    else:
        model, nset = prepare(arm, config)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = OptimConfig(lr=1e-4, weight_decay=0.1, grad_clip=1.0,
                      micro_batch_size=spec["micro_batch"])
    engine = build_engine(engine_name, model, cfg, info, weights=weights)
    if weights is not None:
        weights.close()
    del model
    plan = install(engine, nset.entries) if nset is not None else None
    # Resident after the build: model shard, engine buffers, masks (no step taken yet).
    # The peak above it is what training adds: activations (logits included),
    # gradients, optimizer state and the step's temporaries.
    built = _status_kib("VmRSS") * 1024 - base_rss
    gen = torch.Generator().manual_seed(info.rank)
    vocab = spec["model"]["vocab_size"]

    def batch():
        ids = torch.randint(0, vocab, (spec["micro_batch"], spec["seq"]), generator=gen)
        return [{"input_ids": ids, "labels": ids}]

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(engine, batch(), plan)
        dist.barrier()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    grad, opt = state_bytes(engine)
    peak = _status_kib("VmHWM") * 1024 - base_rss
    # File-backed pages mapped since the reset (library code the first steps touch,
    # e.g. libtorch's backward kernels): counted in RSS, but no tensor of this arm.
    file_pages = _status_kib("RssFile") * 1024 - base_file
    row = {"arm": arm, "config": config, "engine": engine_name, "rank": info.rank,
           "params": total, "trainable": trainable, "grad_bytes": grad, "opt_bytes": opt,
           "peak_bytes": peak, "built_bytes": built, "file_bytes": file_pages,
           "step_s": times,
           # fp32 logits of one micro-batch: the LM head's largest activation
           "logits_bytes": spec["micro_batch"] * spec["seq"] * vocab * 4}
    Path(args.tmp, f"{engine_name}-{config}-{arm}-{info.rank}.json").write_text(json.dumps(row))
    engine.close()
    shutdown()


def run_arm(args, arm: str, config: str, engine: str) -> dict:
    from launcher.run.spawn import run_local

    run_local(worker, args.nproc, args, arm, config, engine)
    rows = [json.loads(Path(args.tmp, f"{engine}-{config}-{arm}-{r}.json").read_text())
            for r in range(args.nproc)]
    first = rows[0]
    peak = max(rows, key=lambda r: r["peak_bytes"])  # the rank with the largest peak
    return {
        "arm": arm, "config": config, "engine": engine, "params": first["params"],
        "trainable": first["trainable"], "step_s": statistics.median(first["step_s"]),
        "step_samples": first["step_s"],
        "peak_bytes_max_rank": peak["peak_bytes"],
        # on that rank: resident after the build, and file-backed pages mapped since
        "built_bytes_at_peak_rank": peak["built_bytes"],
        "file_bytes_at_peak_rank": peak["file_bytes"],
        "logits_bytes": first["logits_bytes"],
        "grad_opt_bytes_max_rank": max(r["grad_bytes"] + r["opt_bytes"] for r in rows),
        "per_rank": rows,
    }


def ratios(results: list[dict]) -> list[dict]:
    """Each arm against full fine-tuning on the same engine and config."""
    full = {(r["engine"], r["config"]): r for r in results if r["arm"] == "full"}
    out = []
    for r in results:
        f = full.get((r["engine"], r["config"]))
        if f is None:
            continue
        out.append({
            "engine": r["engine"], "config": r["config"], "arm": r["arm"],
            "trainable_fraction": r["trainable"] / f["trainable"],
            "grad_opt_vs_full": r["grad_opt_bytes_max_rank"] / f["grad_opt_bytes_max_rank"],
            # None where no peak was measured (the CPU smoke run of gpu_arm)
            "peak_vs_full": (r["peak_bytes_max_rank"] / f["peak_bytes_max_rank"]
                             if f["peak_bytes_max_rank"] else None),
            "step_vs_full": r["step_s"] / f["step_s"],
        })
    return out


def _mib(r: dict, part: str) -> str:
    """The peak rank's resident MiB after the build, or what training added on top."""
    built = r.get("built_bytes_at_peak_rank")
    if built is None:  # gpu_arm rows: one peak, no breakdown
        return "-"
    value = built if part == "built" else r["peak_bytes_max_rank"] - built
    return f"{value / 2**20:.0f}"


def table(results: list[dict], rel: list[dict]) -> str:
    lines = ["| engine | model | arm | params | trainable | step s (median) | step / full "
             "| peak MiB/rank | full / peak | built MiB | training MiB | grad+opt MiB/rank "
             "| grad+opt / full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(x["engine"], x["config"], x["arm"]): x for x in rel}
    for r in results:
        x = by[(r["engine"], r["config"], r["arm"])]
        below = f"{1 / x['peak_vs_full']:.2f}x" if x["peak_vs_full"] else "-"
        lines.append(
            f"| {r['engine']} | {r['config']} | {r['arm']} | {r['params'] / 1e6:.1f}M | "
            f"{r['trainable'] / 1e6:.2f}M | {r['step_s']:.3f} | {x['step_vs_full']:.2f} | "
            f"{r['peak_bytes_max_rank'] / 2**20:.0f} | {below} | {_mib(r, 'built')} | "
            f"{_mib(r, 'training')} | "
            f"{r['grad_opt_bytes_max_rank'] / 2**20:.1f} | {x['grad_opt_vs_full']:.4f} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    import peft
    import torch
    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:  # the GPU arms need no DeepSpeed
        ds_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": ds_version, "gpu": gpu,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg": os.getloadavg()}


def timed_step(engine, ids, plan, cuda: bool) -> float:
    """One training step on `ids` (inputs and labels); its wall seconds, device included."""
    import torch

    from ncft.train import train_step

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_step(engine, [{"input_ids": ids, "labels": ids}], plan)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def gpu_arm(arm: str, config: str, device: str = "cuda", dtype: str = "float32") -> dict:
    """One arm on one GPU, single engine, in this process (peak = max allocated).

    `device="cpu"` runs the same code without the CUDA memory statistics (peak 0):
    the tiny end-to-end check of `benchmarks/gpu_bench.py --smoke`.
    """
    import gc

    import torch

    from launcher.dist import DistInfo
    from launcher.engines import OptimConfig, build_engine
    from ncft.masks.install import install

    cuda = device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    spec = CONFIGS[config]
    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="nccl" if cuda else "gloo",
                    device=torch.device(device))
    model, nset = prepare(arm, config, device)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = OptimConfig(lr=1e-4, weight_decay=0.1, grad_clip=1.0,
                      micro_batch_size=spec["micro_batch"], compute_dtype=getattr(torch, dtype))
    engine = build_engine("single", model, cfg, info)
    plan = install(engine, nset.entries) if nset is not None else None
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = spec["model"]["vocab_size"]
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(0, vocab, (spec["micro_batch"], spec["seq"]), generator=gen,
                            device=device)
        seconds = timed_step(engine, ids, plan, cuda)
        if i >= spec["warmup"]:
            times.append(seconds)
    grad, opt = state_bytes(engine)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    engine.close()
    del engine, model, plan
    return {"arm": arm, "config": config, "engine": f"single-{device}", "dtype": dtype,
            "params": total,
            "trainable": trainable, "step_s": statistics.median(times), "step_samples": times,
            "peak_bytes_max_rank": peak, "grad_opt_bytes_max_rank": grad + opt}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON report path")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {sorted(CONFIGS)}")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override measured steps")
    parser.add_argument("--gpu", action="store_true", help="one GPU, single engine")
    parser.add_argument("--whole", dest="sharded", action="store_false",
                        help="build the whole model on every rank (the pre-#21 measurement) "
                             "instead of loading shards from files as `ncft run` does")
    parser.add_argument("--device", default="cuda", help="with --gpu: cuda, or cpu to test")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="with --gpu: compute dtype (masters and moments stay fp32)")
    args = parser.parse_args(argv)
    for c in args.configs.split(","):
        if c not in CONFIGS:
            parser.error(f"unknown config {c!r}; choose from {sorted(CONFIGS)}")
    if args.steps is not None:
        for c in CONFIGS.values():
            c["steps"], c["warmup"] = args.steps, min(c["warmup"], 1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.tmp = tempfile.mkdtemp(prefix="ncft-sparse-delta-")
    if args.sharded and not args.gpu:  # written once, before any rank starts
        for config in args.configs.split(","):
            saved_weights(config, Path(args.tmp) / "weights")
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    results = []
    for config in args.configs.split(","):
        for engine in ["single-gpu"] if args.gpu else args.engines.split(","):
            for arm in args.arms.split(","):
                t0 = time.perf_counter()
                results.append(gpu_arm(arm, config, args.device, args.dtype) if args.gpu
                               else run_arm(args, arm, config, engine))
                print(f"[sparse_delta] {engine}/{config}/{arm}: step "
                      f"{results[-1]['step_s']:.3f}s ({time.perf_counter() - t0:.0f}s)",
                      flush=True)
    rel = ratios(results)
    report = {"benchmark": "sparse_delta", "command": command, "machine": machine(),
              "world_size": args.nproc, "fraction": FRACTION,
              "lora_rank": {c: lora_rank(c) for c in args.configs.split(",")},
              "results": results, "ratios": rel}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["machine"]))
    print(table(results, rel), flush=True)


if __name__ == "__main__":
    main()
