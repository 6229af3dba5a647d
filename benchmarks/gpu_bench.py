"""`make gpu-bench`: the 24 GB 7B check, the 1.1B mode comparison, the mask pieces.

Three parts, each in its own subprocess with its own time limit (sized for about 8
minutes on one H100), one JSON report:

(a) **7B on a 24 GiB budget.** A random-init Llama-2-7B from the shipped config
    (`launcher/plan/configs/llama-2-7b-hf`), written once as bf16 safetensors (every
    value exact in bf16, as a bf16 checkpoint's are) and loaded shard by shard as
    `ncft run` does; `training.update=sparse_delta` over a random 5% of the FFN units
    of every layer, activation checkpointing, bf16 compute, 4 x 512 tokens, 5
    optimizer steps on each of ZeRO-3, FSDP2 and single, one fresh process each,
    with `torch.cuda.set_per_process_memory_fraction` capping the process at 24 GiB.
    Recorded: peak allocated and reserved device memory, the plan's total for the
    same stage (`launcher.plan.memory.per_rank_bytes`), their ratio (goal: within
    10%), and the step times.
(b) **1.1B, the four modes.** `benchmarks/sparse_delta.py --gpu --dtype bfloat16`:
    full fine-tuning, masked, sparse_delta and peft LoRA at matched trainable
    elements, step time and peak memory, single engine.
(c) **The mask pieces per engine.** `benchmarks/mask_overhead.py --configs 1b`:
    `apply_to_grads` and the masked optimizer step against an unmasked step on
    ZeRO-3, FSDP2 and FSDP1.

`--smoke` runs the same code at tiny size on CPU (the tiny Llama config, 1-2 steps,
no memory cap) so the suite checks the script end to end
(tests/benchmarks/test_gpu_bench_smoke.py); its numbers mean nothing.

    python benchmarks/gpu_bench.py --out runs/gpu-bench            # on the GPU machine
    python benchmarks/gpu_bench.py --out /tmp/gpu-bench --smoke     # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_check import _run  # noqa: E402
from benchmarks.sparse_delta import timed_step  # noqa: E402

GIB = 1 << 30
CAP_GIB = 24
MEMORY_ENGINES = ("deepspeed", "fsdp2", "single")
FRACTION = 0.05
# (config dir under launcher/plan/configs, micro batch, seq len, steps)
SIZES = {"full": ("llama-2-7b-hf", 4, 512, 5), "smoke": ("tiny-random-llama", 2, 32, 2)}


def write_weights(config_dir: Path, out: Path) -> None:
    """A random bf16 checkpoint of `config_dir`'s model (norm weights 1, the rest N(0, 0.02))."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # generating is faster there
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, p in meta.named_parameters():
        if p.dim() == 1:
            state[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
            state[name] = t.normal_(0.0, 0.02, generator=gen).cpu()
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size="5GB")


def _stage(meta, nset):
    """The planner's model of this sparse-delta stage."""
    from launcher.plan.model import describe, with_params, with_trainable
    from launcher.plan.stage import sparse_delta_params

    params = dict(meta.named_parameters())
    fractions = {fqn: (sel.indices.numel() / params[fqn].shape[sel.axis], sel.axis)
                 for fqn, sel in nset.entries.items()}
    stage = with_trainable(describe(meta, "gpu-bench"), fractions)
    return with_params(stage, sparse_delta_params(stage))


def memory_worker(args: argparse.Namespace) -> None:
    """Part (a) for each of `args.engine` (comma-separated), in this process (world 1)."""
    from launcher.dist import init_distributed, shutdown

    info = init_distributed()
    for engine in args.engine.split(","):
        row = memory_row(engine, info, args.weights, args.smoke)
        Path(args.out, f"memory_{engine}.json").write_text(json.dumps(row, indent=2) + "\n")
    shutdown()


def memory_row(engine_name: str, info, weights_dir: Path, smoke: bool) -> dict:
    """Part (a) for one engine: build from the files, 5 steps, peak memory vs plan."""
    import warnings
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from benchmarks.mask_overhead import random_neuron_set
    from launcher.engines import OptimConfig, build_engine
    from launcher.engines.weights import SafetensorsWeights
    from launcher.plan.memory import Batch, per_rank_bytes
    from launcher.plan.report import ds_tuning
    from launcher.run.delta_weights import DeltaWeights
    from ncft import sparse_delta

    cuda = info.device.type == "cuda"
    _, micro, seq, steps = SIZES["smoke" if smoke else "full"]
    if cuda:
        total = torch.cuda.get_device_properties(info.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / total), info.device)
    config = AutoConfig.from_pretrained(weights_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    nset = random_neuron_set(meta, FRACTION)
    plan = per_rank_bytes(engine_name, _stage(meta, nset), "bfloat16", 1, Batch(micro, seq),
                          True, 0, ds_tuning(SimpleNamespace(
                              engine=SimpleNamespace(ds_config="zero3"))))
    deltas = sparse_delta.install(model, nset.entries)
    weights = DeltaWeights(SafetensorsWeights.from_path(weights_dir), deltas)
    cfg = OptimConfig(lr=1e-5, grad_clip=1.0, micro_batch_size=micro,
                      compute_dtype=torch.bfloat16, activation_checkpointing=True)
    engine = build_engine(engine_name, model.train(), cfg, info, weights=weights)
    weights.close()
    engine.module.train()
    gen = torch.Generator().manual_seed(0)
    times = [timed_step(engine, torch.randint(0, config.vocab_size, (micro, seq), generator=gen),
                        None, cuda) for _ in range(steps)]
    row = {"engine": engine_name, "device": str(info.device), "steps": steps,
           "tokens_per_step": micro * seq, "step_s": times,
           "plan_total_bytes": plan["total"], "plan": plan,
           "host_exact_bytes": getattr(getattr(engine, "frozen", None), "host_bytes",
                                       lambda: None)()}
    if cuda:
        row["cap_bytes"] = CAP_GIB * GIB
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(info.device)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(info.device)
        row["allocated_over_plan"] = row["peak_allocated_bytes"] / plan["total"]
    engine.close()
    return row


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def memory_part(out: Path, smoke: bool, timeout: int) -> dict:
    """Part (a): write the weights once, then one process per engine."""
    config_dir = REPO / "launcher" / "plan" / "configs" / SIZES["smoke" if smoke else "full"][0]
    weights = out / "weights"
    t0 = time.perf_counter()
    if not (weights / "config.json").is_file():
        write_weights(config_dir, weights)
    part = {"weights_s": round(time.perf_counter() - t0, 1), "rows": []}
    # On the GPU a fresh process per engine (its own peak and cap); the smoke run
    # takes all three in one process (imports dominate it).
    groups = [",".join(MEMORY_ENGINES)] if smoke else list(MEMORY_ENGINES)
    for group in groups:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--engine", group,
               "--weights", str(weights), "--out", str(out)] + (["--smoke"] if smoke else [])
        r = _run(cmd, timeout, out / f"memory_{group.replace(',', '_')}.log")
        for engine in group.split(","):
            part["rows"].append({"engine": engine, **r,
                                 "result": _json(out / f"memory_{engine}.json")})
    return part


def modes_part(out: Path, smoke: bool, timeout: int) -> dict:
    """Part (b): full / masked / sparse_delta / LoRA at 1.1B, one GPU, bf16 compute."""
    result = out / "modes.json"
    size = ["--configs", "7m", "--steps", "1", "--device", "cpu"] if smoke else \
        ["--configs", "1b"]
    r = _run([sys.executable, "benchmarks/sparse_delta.py", "--gpu", "--dtype", "bfloat16",
              *size, "--out", str(result)], timeout, out / "modes.log")
    return {**r, "result": _json(result)}


def pieces_part(out: Path, smoke: bool, timeout: int) -> dict:
    """Part (c): the mask pieces on ZeRO-3, FSDP2 and FSDP1, one rank each."""
    result = out / "mask_pieces.json"
    size = ["--configs", "tiny", "--warmup", "1", "--pairs", "1"] if smoke else \
        ["--configs", "1b"]
    r = _run([sys.executable, "benchmarks/mask_overhead.py", "--nproc", "1", *size,
              "--engines", "deepspeed,fsdp2,fsdp1", "--dtype", "bfloat16", "--out", str(result)],
             timeout, out / "mask_pieces.log")
    return {**r, "result": _json(result)}


def machine() -> dict:
    """The card (if any) and the software versions."""
    import platform

    import torch

    out = {"torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_memory_bytes=props.total_memory)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (main) or row file (--worker)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU is fine")
    parser.add_argument("--parts", default="memory,modes,pieces")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # comma-separated
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        memory_worker(args)
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu-bench needs CUDA (or --smoke for the tiny CPU run)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # The parts' scripts import the project: the repository on their path.
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parts = {"memory": memory_part, "modes": modes_part, "pieces": pieces_part}
    limits = {"memory": 200, "modes": 150, "pieces": 150}  # per subprocess, seconds
    report = {"benchmark": "gpu_bench", "smoke": args.smoke, "machine": machine(),
              "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        report[name] = parts[name](args.out, args.smoke, limits[name] * (3 if args.smoke else 1))
        print(f"[gpu_bench] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [n for n in args.parts.split(",")
              if any(r.get("rc") != 0 for r in report[n].get("rows", [report[n]]))]
    print(f"[gpu_bench] wrote {args.out / 'gpu_bench.json'}; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
