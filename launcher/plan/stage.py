"""What one training stage of a spec trains: every parameter, selected neurons, or LoRA.

| method | trainable | masks |
|---|---|---|
| full, seqft, per_task | every parameter | none |
| neurons, random_neurons, ncft, wncft | projections in `selection.modules` | selected rows/cols |
| lora, seqlora | the adapters (`lora.r`, `lora.target_modules`) | none |
| olora | the last task's adapter; the earlier tasks' adapters are frozen | none |

The groups come from the methods table (`ncft.continual.methods`): `trains` "all",
"neurons" or "lora". O-LoRA is planned at its largest stage, the last one, which holds
one adapter per task.

With `training.update: sparse_delta` a neuron stage freezes every matrix and trains
one small delta per selected weight/bias instead (`ncft.sparse_delta`): parameters
grow by the deltas, gradients and AdamW state cover the selected elements only, and
no masks are allocated.

For neuron methods the selected fraction of each projection is what
`ncft.selection.top_k` takes: `resolve_count` of each pool (a layer's candidates with
`selection.per_layer`, else all of them). With `selection.union_with_previous` the
last stage trains the union of every task's set; the plan assumes disjoint sets (the
worst case), i.e. `min(pool, tasks x k)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from launcher.plan.model import ModelInfo, ParamInfo, with_params, with_trainable
from ncft.continual.methods import METHODS
from ncft.selection import resolve_count
from ncft.selection.pipeline import candidate_groups

__all__ = ["Stage", "lora_params",
           "neuron_fractions", "sparse_delta_params", "stage_for"]


@dataclass(frozen=True)
class Stage:
    """A stage's model with its trainable parameters marked, and a one-line summary."""

    model: ModelInfo
    summary: str
    selected_fraction: float | None


def neuron_fractions(meta: Any, spec: Any) -> dict[str, tuple[float, int]]:
    """`fqn -> (expected selected fraction, axis)` for a neuron method's stage."""
    from types import SimpleNamespace


    sel = spec.selection
    groups = candidate_groups(meta, SimpleNamespace(unit=sel.unit, modules=tuple(sel.modules)))
    pools: dict[Any, list] = {}
    for g in groups:
        pools.setdefault(g.layer if sel.per_layer else None, []).append(g)
    repeats = len(spec.tasks) if sel.union_with_previous else 1
    out = {}
    for pool in pools.values():
        size = sum(g.size for g in pool)
        k = min(size, repeats * resolve_count(size, sel.fraction, sel.count))
        for g in pool:
            for fqn, axis in g.pieces:
                out[fqn] = (k / size, axis)
    return out


def lora_params(
    info: ModelInfo, r: int, targets: list[str], frozen_adapters: int = 0
) -> list[ParamInfo]:
    """The base parameters, frozen, plus peft's `lora_A` `[r, in]` and `lora_B` `[out, r]`.

    `frozen_adapters` more adapters of the same shape are added frozen (O-LoRA's
    earlier tasks, named `task{i}`; the trainable one is then `task{frozen_adapters}`).
    """
    frozen = [replace(p, trainable=False) for p in info.params]
    adapters = []
    names = ([f"task{i}" for i in range(frozen_adapters + 1)] if frozen_adapters
             else ["default"])
    for p in info.params:
        leaf = p.module.rsplit(".", 1)[-1]
        if leaf in targets and p.fqn == f"{p.module}.weight" and len(p.shape) == 2:
            out_f, in_f = p.shape
            for adapter in names:
                for name, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
                    module = f"{p.module}.{name}.{adapter}"
                    adapters.append(ParamInfo(f"{module}.weight", shape, module=module,
                                              trainable=adapter == names[-1]))
    if not adapters:
        raise ValueError(f"lora.target_modules: {targets} names no linear layer of the model")
    return frozen + adapters


def stage_for(spec: Any, method: str, base: ModelInfo, meta: Any, engine: str) -> Stage:
    """The stage `method` trains on `base` under `spec`'s selection and LoRA settings."""
    row = METHODS.get(method)
    if row is None:
        raise ValueError(f"method: unknown {method!r}")
    if row.trains == "all":
        return Stage(base, f"{method}: every parameter trains ({base.numel:,} elements)", None)
    if row.lora:
        lora = spec.lora
        earlier = len(spec.tasks) - 1 if row.adapter_per_task else 0
        model = with_params(base, lora_params(base, lora.r, list(lora.target_modules), earlier))
        count = sum(p.numel for p in model.params if p.trainable)
        frozen = f", {earlier} earlier adapters frozen" if earlier else ""
        return Stage(model, f"{method}: LoRA r={lora.r} on {', '.join(lora.target_modules)} "
                     f"({count:,} adapter elements train, fp32{frozen})", None)
    fractions = neuron_fractions(meta, spec)
    sparse = getattr(spec.training, "update", "masked") == "sparse_delta"
    model = with_trainable(base, fractions, fsdp1_units=engine == "fsdp1" and not sparse)
    trainable = [p for p in model.params if p.trainable]
    elems = sum(p.numel for p in trainable)
    chosen = sum(p.numel * (p.selected or 0.0) for p in trainable)
    sel = spec.selection
    amount = f"{sel.fraction:.1%}" if sel.fraction is not None else f"{sel.count} units"
    where = "per layer" if sel.per_layer else "globally"
    summary = (
        f"{method}: {amount} of {'FFN units' if sel.unit == 'neuron' else 'rows'} {where} "
        f"({', '.join(sel.modules)}); {len(trainable)} of {len(model.params)} tensors "
        f"trainable ({elems:,} elements), {chosen / max(elems, 1):.1%} of them selected"
    )
    if sparse:
        model = with_params(model, sparse_delta_params(model))
        count = sum(p.numel for p in model.params if p.trainable)
        summary += f"; sparse_delta: {count:,} delta elements train, matrices frozen, no masks"
    return Stage(model, summary, chosen / max(elems, 1))


def sparse_delta_params(info: ModelInfo) -> list[ParamInfo]:
    """Masked-stage parameters as `training.update: sparse_delta` lays them out.

    Every parameter is frozen; each selected one gets, right after it (same layer,
    so the same FSDP unit), its delta `ncft_delta.<leaf>`: the selected rows/columns
    (expected count) as a trainable parameter of its own module, unmasked.
    """
    out = []
    for p in info.params:
        out.append(replace(p, trainable=False, selected=None))
        if not p.trainable or not p.selected:
            continue
        k = max(1, round(p.selected * p.shape[p.axis]))
        shape = tuple(k if i == p.axis else dim for i, dim in enumerate(p.shape))
        module = f"{p.module}.ncft_delta"
        out.append(ParamInfo(f"{module}.{p.fqn.rsplit('.', 1)[-1]}", shape, module=module))
    return out
