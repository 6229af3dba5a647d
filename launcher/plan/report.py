"""`ncft plan`: a spec's per-rank memory, as text or JSON, without loading weights."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from launcher.errors import UserError
from launcher.plan.memory import (
    TERMS,
    Batch,
    DsTuning,
    per_rank_bytes,
)
from launcher.plan.model import describe, meta_model, resolve_config
from launcher.plan.shards import ENGINES
from launcher.plan.stage import stage_for

GIB = 1 << 30
COMPARE_METHODS = ("full", "lora")


@dataclass(frozen=True)
class Target:
    """Where the plan runs: ranks, nodes, GPU memory."""

    world_size: int
    nodes: int
    gpu_memory_gib: float


def target_of(spec: Any, world_size: int | None, nodes: int | None, gpu_gib: float) -> Target:
    """Ranks and nodes from the flags, defaulting to the spec's `engine` section.

    Raises:
        UserError: For counts that do not fit together.
    """
    eng = spec.engine
    nodes = nodes or eng.nnodes
    world = world_size or nodes * eng.nproc_per_node
    if world < 1 or nodes < 1 or world % nodes:
        raise UserError(f"--world-size {world} must be a positive multiple of --nodes {nodes}")
    if eng.backend == "single" and world != 1:
        raise UserError(f"engine.backend single runs 1 process, not --world-size {world}; "
                        "plan with engine.backend=deepspeed|fsdp2|fsdp1")
    if gpu_gib <= 0:
        raise UserError(f"--gpu-memory must be > 0 GiB, got {gpu_gib}")
    return Target(world, nodes, gpu_gib)


def ds_tuning(spec: Any) -> DsTuning:
    """ZeRO-3 memory settings from the spec's DeepSpeed JSON (DeepSpeed's defaults else)."""
    from launcher.engines.ds_config import load

    zero = load(spec.engine.ds_config).get("zero_optimization", {})
    base = DsTuning()
    return DsTuning(
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                           base.persistence_threshold)),
        reduce_bucket_size=int(zero.get("reduce_bucket_size", base.reduce_bucket_size)),
        sub_group_size=int(zero.get("sub_group_size", base.sub_group_size)),
    )


def batch_of(spec: Any) -> Batch:
    """Tokens per rank per micro-batch: micro batch x the longest task's max_length."""
    t = spec.training
    return Batch(t.micro_batch_size, max(task.max_length for task in spec.tasks), t.grad_accum)


def make_plan(spec: Any, target: Target, spec_path: str = "") -> dict[str, Any]:
    """The plan of `spec` on `target`: the JSON document `ncft plan --json` prints."""
    started = time.perf_counter()
    config, source = resolve_config(spec.model.name_or_path)
    meta = meta_model(config)
    base = describe(meta, source)
    engine, dtype = spec.engine.backend, spec.model.dtype
    ds, batch = ds_tuning(spec), batch_of(spec)
    ckpt = bool(spec.training.activation_checkpointing)
    world = target.world_size
    stage = stage_for(spec, spec.method, base, meta, engine)
    per_rank = per_rank_bytes(engine, stage.model, dtype, world, batch, ckpt, ds=ds)
    other = per_rank_bytes(engine, stage.model, dtype, world, batch, not ckpt, ds=ds)
    acts = {"checkpointing": per_rank["activations"] if ckpt else other["activations"],
            "no_checkpointing": other["activations"] if ckpt else per_rank["activations"]}
    compare = _compare(spec, base, meta, world, batch, ckpt, ds)
    budget = target.gpu_memory_gib * GIB
    return {
        "spec": spec_path,
        "model": {"name_or_path": spec.model.name_or_path, "config": source,
                  "model_type": base.model_type, "parameters": base.numel,
                  "layers": len(base.layers), "dtype": dtype},
        "engine": engine, "world_size": world, "nodes": target.nodes, "rank": 0,
        "method": spec.method, "stage": stage.summary,
        "selected_fraction": stage.selected_fraction,
        "tokens": {"micro_batch": batch.micro_batch, "seq_len": batch.seq_len,
                   "grad_accum": batch.grad_accum},
        "activation_checkpointing": ckpt,
        "per_rank": {k: int(v) for k, v in per_rank.items()},
        "activations": {k: int(v) for k, v in acts.items()},
        "gpu_memory": int(budget), "fits": per_rank["total"] <= budget,
        "headroom": int(budget - per_rank["total"]),
        "compare": compare,
        "plan_seconds": round(time.perf_counter() - started, 3),
    }


def _compare(spec, base, meta, world: int, batch: Batch, ckpt: bool, ds: DsTuning) -> list:
    """Total per rank of the spec's method, full fine-tuning and LoRA on every engine."""
    out = []
    engines = ENGINES if world == 1 else ENGINES[:-1]
    for method in dict.fromkeys((spec.method, *COMPARE_METHODS)):
        for eng in engines:
            try:
                stage = stage_for(spec, method, base, meta, eng)
            except ValueError as err:  # e.g. lora.target_modules absent from this model
                out.append({"engine": eng, "method": method, "total": None, "note": str(err)})
                continue
            plan = per_rank_bytes(eng, stage.model, spec.model.dtype, world, batch, ckpt, ds=ds)
            out.append({"engine": eng, "method": method, "total": int(plan["total"])})
    return out


def _human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n:8.0f} B  "


def format_text(plan: dict[str, Any]) -> str:
    """The human-readable plan (what `ncft plan` prints without `--json`)."""
    m, tok, pr = plan["model"], plan["tokens"], plan["per_rank"]
    world, nodes = plan["world_size"], plan["nodes"]
    precision = ("bf16 compute, fp32 master weights and AdamW moments"
                 if m["dtype"] != "float32" else "fp32 weights, compute and AdamW moments")
    if m["dtype"] != "float32":
        precision += ", frozen weights bf16"  # exact values on the host (engines/frozen.py)
    lines = [
        f"model    {m['name_or_path']} [{m['config']}]: {m['model_type']}, "
        f"{m['parameters']:,} parameters, {m['layers']} layers",
        f"engine   {plan['engine']}, {world} rank{'s' if world > 1 else ''} "
        f"({nodes} node{'s' if nodes > 1 else ''} x {world // nodes}), "
        f"{precision}",
        f"stage    {plan['stage']}",
        f"tokens   {tok['micro_batch']} x {tok['seq_len']} per micro-batch and rank, "
        f"grad_accum {tok['grad_accum']}, activation checkpointing "
        f"{'on' if plan['activation_checkpointing'] else 'off'}",
        "",
        "per rank (rank 0)",
    ]
    for term in TERMS:
        label = "buffers (estimate)" if term == "buffers" else term
        lines.append(f"  {label:<20}{_human(pr[term])}  {pr[term]:>16,} B")
    lines.append(f"  {'total':<20}{_human(pr['total'])}  {pr['total']:>16,} B")
    acts = plan["activations"]
    lines += [
        f"activations: {_human(acts['no_checkpointing']).strip()} without checkpointing, "
        f"{_human(acts['checkpointing']).strip()} with (training.activation_checkpointing)",
    ]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {plan['gpu_memory'] / GIB:g} GiB per GPU "
                 f"(headroom {_human(plan['headroom']).strip()}; CUDA context, NCCL and "
                 "fragmentation not counted)")
    lines += ["", "total per rank by engine and method (same ranks, tokens and precision)"]
    methods = list(dict.fromkeys(c["method"] for c in plan["compare"]))
    engines = list(dict.fromkeys(c["engine"] for c in plan["compare"]))
    lines.append("  " + f"{'engine':<10}" + "".join(f"{x:>14}" for x in methods))
    table = {(c["engine"], c["method"]): c["total"] for c in plan["compare"]}
    for eng in engines:
        row = "".join(f"{_human(table[eng, x]) if table[eng, x] is not None else 'n/a':>14}"
                      for x in methods)
        lines.append(f"  {eng:<10}{row}")
    lines.append(f"planned in {plan['plan_seconds']:.2f} s")
    return "\n".join(lines)


def plan_command(ns: Any) -> int:
    """Entry point of `ncft plan` (argparse namespace from `launcher.cli.main`)."""
    import sys

    from launcher.spec import SpecError, load_spec

    try:
        spec = load_spec(ns.spec, ns.overrides)
    except SpecError as err:
        print(f"invalid spec {ns.spec}:\n{err}", file=sys.stderr)
        return 2
    # Other user errors (ValueError) reach `launcher.cli.main`, which prints one line.
    plan = make_plan(spec, target_of(spec, ns.world_size, ns.nodes, ns.gpu_memory), ns.spec)
    print(json.dumps(plan, indent=2) if ns.json else format_text(plan))
    return 0
