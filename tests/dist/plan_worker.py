"""One launched job: count what each real engine allocates, next to the planner's numbers.

Run under torchrun by tests/launcher/plan/test_real_alloc.py. For every backend and
for a masked (10% of FFN units per layer) and a full fine-tuning stage (and, on single,
FSDP2 and FSDP1, a sparse-delta stage over the same units), it builds a small random
Llama (matrices of ~2^17 elements, so segments take the structured path, and
ZeRO-3/FSDP1 cut rows mid-way), takes one optimizer step and one more backward, then
sums the bytes of the distinct storages behind the rank's parameters, gradients,
optimizer state and mask tensors. Each rank writes `{backend}-{stage}-{rank}.json` holding
both the measured and the planned bytes.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.engines import OptimConfig, build_engine
from launcher.plan.memory import Batch, DsTuning, per_rank_bytes
from launcher.plan.model import describe, with_params, with_trainable
from launcher.plan.report import ds_tuning
from launcher.plan.stage import sparse_delta_params
from ncft import sparse_delta
from ncft.arch import get_adapter
from ncft.engine import local_tensor
from ncft.masks.install import freeze_unselected, install
from ncft.scoring.groups import unit_groups
from ncft.selection import to_neuron_set, top_k
from tests.support.spawn import backends_main

VOCAB, SEQ, MICRO = 97, 16, 2
FRACTION = 0.1
# Engines whose sparse-delta stage the planner is checked on (frozen base lowered).
DELTA_BACKENDS = ("single", "fsdp2", "fsdp1")


def small_llama() -> LlamaForCausalLM:
    """2 layers, h=264, d_ff=517 (odd: FSDP2 chunks and ZeRO-3 partitions get padding);
    gate/up/down hold 136,488 elements, so 2-rank segments exceed 2^16."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=264, intermediate_size=517, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def neuron_set(model):
    """10% of the units of every layer, chosen by seeded random scores."""
    groups = unit_groups(get_adapter(model).mlp_blocks(model), ("gate", "up", "down"))
    gen = torch.Generator().manual_seed(7)
    scores = {g.name: torch.rand(g.size, generator=gen) for g in groups}
    return to_neuron_set(top_k(scores, groups, fraction=FRACTION), groups, {})


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = local_tensor(t).untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _param_tensors(backend: str, engine) -> list[torch.Tensor]:
    if backend == "deepspeed":
        zero = engine._zero
        params = list(engine.module.parameters())
        return ([p.ds_tensor for p in params] + [p.data for p in params]
                + list(zero.fp32_partitioned_groups_flat))
    if backend == "fsdp1":
        return [u._flat_param for _, u in engine._fsdp_units()]
    return list(engine.module.parameters())


def _grad_tensors(backend: str, engine) -> list[torch.Tensor]:
    if backend == "deepspeed":
        return [engine._zero.grad_partitions_flat_buffer]
    if backend == "fsdp1":
        return [u._flat_param.grad for _, u in engine._fsdp_units()]
    return [p.grad for p in engine.module.parameters()]


def _mask_tensors(engine, plan, nset) -> list[torch.Tensor]:
    if plan is None:
        return []
    # The plan's index and bool tensors (the optimizer steps with the same ones) and
    # any dense-mask index the optimizer built (none when RankMasks installs).
    out = list(plan.owned) + list(engine.optimizer._trainable_index.values())
    return out + [sel.compact for sel in nset.entries.values()]  # the held (shared) lists


def measure(backend: str, engine, plan, nset) -> dict[str, int]:
    """Bytes of the distinct storages behind each category on this rank."""
    states = [t for s in engine.optimizer.state.values() for t in s.values()]
    return {
        "parameters": _storage_bytes(_param_tensors(backend, engine)),
        "gradients": _storage_bytes(_grad_tensors(backend, engine)),
        "optimizer": _storage_bytes(states),
        "masks": _storage_bytes(_mask_tensors(engine, plan, nset)),
    }


def _batch(rank: int, device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=torch.Generator().manual_seed(rank))
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def planned(backend, model, nset, world, rank, tuning: DsTuning, dtype: str,
            deltas: bool = False) -> dict[str, dict]:
    info = describe(model, "small")
    out = {}
    if nset is None:
        stage = info
    else:
        fractions = {}
        for fqn, sel in nset.entries.items():
            shape = dict(model.named_parameters())[fqn].shape
            fractions[fqn] = (sel.indices.numel() / shape[sel.axis], sel.axis)
        stage = with_trainable(info, fractions, fsdp1_units=backend == "fsdp1" and not deltas)
        if deltas:
            stage = with_params(stage, sparse_delta_params(stage))
    batch = Batch(MICRO, SEQ)
    out["expected"] = per_rank_bytes(backend, stage, dtype, world, batch, False, rank, tuning)
    if nset is not None and not deltas:
        out["exact"] = per_rank_bytes(backend, stage, dtype, world, batch, False, rank,
                                      tuning, selections=nset.entries)
    return out


def engines_own_precision() -> bool:
    """True once engines take `OptimConfig.compute_dtype` (fp32 masters on every engine).

    Before that (issue #9 part 3), only ZeRO-3 keeps fp32 masters, chosen by the
    model's dtype.
    """
    return "compute_dtype" in {f.name for f in fields(OptimConfig)}


def optim_config(dtype: str) -> tuple[OptimConfig, torch.dtype]:
    """The engine settings for `dtype`, and the dtype to build the model in."""
    kwargs = dict(lr=1e-3, weight_decay=0.1, grad_clip=1.0, micro_batch_size=MICRO)
    if engines_own_precision():
        return OptimConfig(**kwargs, compute_dtype=getattr(torch, dtype)), torch.float32
    return OptimConfig(**kwargs), getattr(torch, dtype)


def run_backend(name: str, info, out_dir: Path) -> None:
    """`name` is a backend, optionally with a dtype: `deepspeed:bfloat16`."""
    from types import SimpleNamespace

    backend, _, dtype = name.partition(":")
    dtype = dtype or "float32"
    tuning = ds_tuning(SimpleNamespace(engine=SimpleNamespace(ds_config="zero3")))
    # sparse_delta: every matrix frozen (in bf16 where the engine lowers frozen weights).
    stages = ("masked", "full") + (("sparse_delta",) if backend in DELTA_BACKENDS else ())
    for stage in stages:
        cfg, model_dtype = optim_config(dtype)
        model = small_llama().to(model_dtype)
        nset = neuron_set(model) if stage != "full" else None
        plan_input = small_llama()  # unwrapped twin: the engines rewrite `model` in place
        if stage == "sparse_delta":
            sparse_delta.install(model, nset.entries)
        elif nset is not None:
            freeze_unselected(model, nset.entries)
        engine = build_engine(backend, model, cfg, info)
        plan = install(engine, nset.entries) if stage == "masked" else None
        batch = _batch(info.rank, info.device)
        engine.backward(engine.forward(batch).loss)  # step 1 creates the moments
        if plan is not None:
            plan.apply_to_grads()
        engine.step()
        engine.backward(engine.forward(batch).loss)  # step 2's gradients stay live
        record = {
            "measured": measure(backend, engine, plan, nset),
            "planned": planned(backend, plan_input, nset, info.world_size, info.rank, tuning,
                               dtype, deltas=stage == "sparse_delta"),
            "device": str(info.device),
        }
        path = out_dir / f"{backend}-{dtype}-{stage}-{info.rank}.json"
        path.write_text(json.dumps(record, indent=2))
        engine.close()


if __name__ == "__main__":
    backends_main(run_backend)
