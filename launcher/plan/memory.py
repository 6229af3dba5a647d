"""Per-rank memory of a training stage, by arithmetic on shapes (no weights, no GPU).

What each term counts, on one rank (rank 0 unless asked: it holds the most, since
trailing ranks get the short chunks and the padding):

- **parameters**: every copy of the weights the rank keeps between steps. The
  precision model is the one issue #9 asks of every engine: `model.dtype: bfloat16`
  means bf16 compute with fp32 master weights and fp32 AdamW moments.
  `deepspeed`: each parameter's ZeRO-3 partition `ceil(numel / W)` (padded, see
  `ncft.masks.layout.flat_partition`) in the compute dtype, the fp32 master copy of
  the trainable partitions (a separate copy even in fp32: DeepSpeed's sharing branch
  never fires), and parameters smaller than `stage3_param_persistence_threshold` held
  whole in the compute dtype. `fsdp2`: `ceil(rows / W)` rows of every parameter (FSDP2
  pads its local storage to the first chunk's size), fp32 for trainable parameters
  (the masters) and the compute dtype for frozen ones (`launcher.engines.frozen`;
  their exact values sit in host memory, not counted here). `fsdp1`: one flat shard
  `ceil(T / W)` per FSDP unit (T = the unit's elements), fp32 for trainable units
  and the compute dtype for frozen ones. `single`: every parameter, fp32 except the
  frozen weights of matrix products (`ParamInfo.matmul`), in the compute dtype.
- **gradients**: `deepspeed`: the flat gradient partitions of the trainable
  parameters in the compute dtype (DeepSpeed's default `grad_accum_dtype`). `fsdp2`
  and `fsdp1`: the sharded gradient of the trainable local storage, fp32; with
  `training.grad_accum > 1`, FSDP2 also keeps the *unsharded* gradient of every
  trainable parameter (fp32) between micro-batches (`set_requires_gradient_sync`).
  `single`: one fp32 gradient per trainable element.
- **optimizer**: `MaskedAdamW` state of each tensor the optimizer steps (a ZeRO-3
  fp32 sub-group partition, an FSDP1 flat shard, an FSDP2 local shard, a parameter):
  `exp_avg` and `exp_avg_sq` in fp32 (8 bytes per element) and a 4-byte step. Frozen
  whole matrices have none (docs/architecture.md §3, rule 5).
- **masks** (neuron methods only), what `ncft.masks.install.RankMasks` allocates
  (`ncft.masks.structured`; `MaskedAdamW` shares the plan's tensors): per segment
  with a row selection, the positions of the selected rows among its whole rows; per
  parameter with a column selection, its selected columns once (shared by all its
  segments on the rank); both in the smallest integer type that holds the dimension
  (int16 for Llama-2-7b's 11008). Segments under `DENSE_MAX_NUMEL` elements, or
  whose index would be at least as large, keep one bool per element instead. Plus the
  NeuronSet's own indices (every rank holds the whole set, in host memory; int32,
  one list per layer for the units gate, up and down share, `neuronset_bytes`):
  `mask_bytes` alone is the bookkeeping, `neuronset_bytes` the set. Selected rows
  are assumed spread evenly over a parameter (expected value; with a real NeuronSet,
  `selections=` counts them exactly by building the masks on the meta device).
- **activations**: what autograd keeps for backward for one micro-batch of
  `b = training.micro_batch_size` sequences of `s` = the longest task's `max_length`
  tokens, counted tensor by tensor for the Hugging Face modules in the way of
  Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models" (2022, arXiv:2205.05198, section 4.1); `e` = compute dtype bytes. Per
  token and decoder layer, gated MLP (Llama, Mistral): two RMSNorms `2 (4 + 2e) h`
  (HF upcasts to fp32: input, normalised, output), attention `e (2h + 2 kv)` with
  SDPA (q, k, v and the output, which o_proj reads as a view; no `s x s` scores
  kept), MLP `4 e d_ff` (gate, up, SiLU output, product). Plain MLP (Bloom):
  LayerNorms `4 e h`, q/k/v `3 e h`, merged context `e h`, eager attention
  `(4 + e) a s` (fp32 softmax output and its cast; `4 a s` in fp32), MLP `2 e d_ff`.
  Plus the final norm (`(4 + 2e) h`; Bloom `3 e h` with its embedding LayerNorm) and
  the loss: per token `e V` logits, `4 V` for their fp32 upcast (bf16 only) and
  `4 V` for the fp32 gradient backward starts with. For a small Llama and Bloom the
  saved tensors match a count of what autograd really saves (`saved_tensors_hooks`,
  fp32 on CPU) within 2% (tests/launcher/plan/test_activations.py). With
  `training.activation_checkpointing` each layer keeps only its input (`e h` per
  token) and one layer's activations are live again while it is recomputed.
- **buffers** (an estimate, not measured): transient engine buffers at their peak:
  `single`: autocast's compute-dtype copy of every fp32 (trainable) weight within
  one forward. Sharded engines: unsharded compute-dtype copies of the unit being
  computed and the one prefetched
  (2 x the largest decoder layer; FSDP1/FSDP2 also keep the root unit, embeddings
  and head, unsharded from forward to backward), the unsharded gradient of one layer
  before it is reduced, and for ZeRO-3 the reduce bucket and the fp32 copy of the
  gradients that `step()` flattens per sub-group.
  For masked stages also the masked step's temporaries (`mask_step_bytes`): it
  gathers one block of trainable elements at a time (values, both moments, the
  update and a square root: 5 fp32 per element), and a dense-bool segment computes a
  full-size update (2 fp32 per element); the largest segment sets the peak.

Not counted: the CUDA context, NCCL and allocator fragmentation (keep ~10% free), the
scoring pass of neuron methods (its batch is `selection.batch_size`), evaluation.

Where each parameter's elements sit on a rank is `launcher.plan.shards`'s.
`tests/launcher/plan/test_real_alloc.py` compares parameters, gradients, optimizer
state and masks with the tensors the real CPU engines allocate at 1 and 2 ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from launcher.plan.model import ModelInfo
from launcher.plan.shards import DsTuning, Held, Layout, layer_of, layout
from ncft.masks.structured import DENSE_MAX_NUMEL, MaskBuilder, index_dtype
from ncft.neuron_set import compact_dtype

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
# Engines that store frozen parameters in the compute dtype (launcher/engines/frozen.py).
LOWERS_FROZEN = ("fsdp2", "fsdp1", "single")
TERMS = ("parameters", "gradients", "optimizer", "masks", "activations", "buffers")

def _index_size(size: int) -> int:
    return torch.empty(0, dtype=index_dtype(size)).element_size()


def _expected_segment(h: Held, columns: set[str]) -> float:
    """Expected bytes of one masked piece (selected rows or columns spread evenly)."""
    p, numel = h.param, h.stop - h.start
    if not p.selected or numel == 0:
        return 0.0  # no selection on this parameter: the piece is frozen, no tensor
    width = p.numel // p.shape[0] if len(p.shape) > 1 else 1
    if p.axis == 0:
        head = min(width - h.start % width, numel) if h.start % width else 0
        body = (numel - head) // width
        entries = 0.0 if p.selected >= 1 else p.selected * body
        size = p.shape[0] if p.shape else 1
    else:
        entries = 0.0 if p.selected >= 1 else round(p.selected * width)
        size = width
    index = entries * _index_size(size)
    if numel < DENSE_MAX_NUMEL or numel <= index:
        return float(numel)  # a bool per element
    if p.axis == 1:
        if p.fqn in columns:
            return 0.0  # the column list is shared by the parameter's pieces
        columns.add(p.fqn)
    return index


def mask_bytes(lay: Layout, selections: Mapping | None = None) -> float:
    """Bytes of mask bookkeeping on the rank (0 if no parameter is masked).

    With `selections` (a real NeuronSet's entries), builds the rank's masks on the meta
    device with the code `RankMasks.build` runs and counts their tensors exactly.
    """
    if not any(h.param.selected is not None for h in lay.held):
        return 0.0
    if selections is not None:
        builder = MaskBuilder("meta")
        for h in lay.held:
            sel = selections.get(h.param.fqn)
            if h.opt is not None and sel is not None:
                builder.segment(h.param.fqn, h.param.shape, h.start, h.stop, sel.axis,
                                sel.indices)
        return float(builder.nbytes())
    columns: set[str] = set()
    return sum(_expected_segment(h, columns) for h in lay.held if h.opt is not None)


def mask_step_bytes(lay: Layout) -> float:
    """Peak temporaries of the masked step (see the module docstring's buffers)."""
    peak = 0.0
    for h in lay.held:
        numel = h.stop - h.start
        if h.opt is None or not h.param.selected or numel == 0:
            continue
        if numel < DENSE_MAX_NUMEL:
            peak = max(peak, 2.0 * FP32 * numel)
        else:
            peak = max(peak, 5.0 * FP32 * h.param.selected * numel)
    return peak


def neuronset_bytes(model: ModelInfo) -> float:
    """The NeuronSet's own indices (every rank holds the whole set, in host memory).

    `ncft.neuron_set.Selection` keeps int32 indices where they fit and one list for
    equal selections: a layer's units are the same rows of gate and up (and their
    biases) and columns of down, so they count once per layer and unit dimension.
    """
    lists: dict[tuple[str, int, int], int] = {}
    for p in model.params:
        if p.selected:
            size = p.shape[p.axis] if p.shape else 1
            k = round(p.selected * size)
            lists[(layer_of(p.fqn, model.layers), size, k)] = \
                k * torch.empty(0, dtype=compact_dtype(size)).element_size()
    return float(sum(lists.values()))


@dataclass(frozen=True)
class Batch:
    """Tokens one rank processes per micro-batch.

    Attributes:
        micro_batch: Sequences per micro-batch (`training.micro_batch_size`).
        seq_len: Tokens per sequence (the longest task's `max_length`).
        grad_accum: Micro-batches per optimizer step (`training.grad_accum`).
    """

    micro_batch: int
    seq_len: int
    grad_accum: int = 1


def layer_activation_bytes(model: ModelInfo, e: int, tokens: int, seq_len: int) -> float:
    """Bytes one decoder layer keeps for backward (see the module docstring)."""
    h, f, kv = model.hidden, model.ffn, model.kv_width
    if model.gated:
        # SDPA's output is laid out so that o_proj's input is a view of it: q, k, v, out.
        per_token = 2 * (4 + 2 * e) * h + e * (2 * h + 2 * kv) + 4 * e * f
    else:
        # two LayerNorms (input, output), q/k/v split from the fused projection, the
        # merged context (dense reads it), fc_in output and GELU output
        per_token = 4 * e * h + 3 * e * h + e * h + 2 * e * f
    if not model.fused_attention:
        # eager attention: the fp32 softmax output, and its cast to the compute dtype
        per_token += (FP32 + (e if e < FP32 else 0)) * model.heads * seq_len
    return float(per_token * tokens)


def activation_bytes(
    model: ModelInfo, e: int, batch: Batch, checkpointing: bool, transient: bool = True
) -> float:
    """Activation bytes of one micro-batch, with or without checkpointing.

    Args:
        model: The model.
        e: Bytes per element of the compute dtype.
        batch: Tokens per micro-batch.
        checkpointing: Keep only each layer's input (and one layer live again).
        transient: Also count the fp32 gradient of the logits that backward creates
            first (not a saved tensor, but live at the same time as all of them).
    """
    tokens = batch.micro_batch * batch.seq_len
    layer = layer_activation_bytes(model, e, tokens, batch.seq_len)
    # Logits in the compute dtype, the loss's fp32 upcast of them (a no-op in fp32),
    # then the fp32 gradient of the logits.
    logits = e + (FP32 if e < FP32 else 0) + (FP32 if transient else 0)
    # Final RMSNorm as in the layers; Bloom: its embedding LayerNorm's output and the
    # final LayerNorm's input and output.
    norms = (4 + 2 * e) * model.hidden if model.gated else 3 * e * model.hidden
    head = float(tokens * (norms + logits * model.vocab))
    num_layers = len(model.layers)
    if checkpointing:
        return num_layers * e * model.hidden * tokens + layer + head
    return num_layers * layer + head


def buffer_bytes(
    engine: str, model: ModelInfo, e: int, ds: DsTuning, trainable_local: int
) -> float:
    """Transient engine buffers at their peak (an estimate; see module docstring)."""
    if engine == "single":
        # autocast caches a compute-dtype copy of every fp32 weight within one forward;
        # frozen weights are already stored in the compute dtype (LOWERS_FROZEN)
        trained = sum(p.numel for p in model.params if p.trainable)
        return float(e * trained) if e < FP32 else 0.0
    per_layer: dict[str, int] = {}
    outside = 0
    for p in model.params:
        layer = layer_of(p.fqn, model.layers)
        if layer:
            per_layer[layer] = per_layer.get(layer, 0) + p.numel
        else:
            outside += p.numel
    largest = max(per_layer.values(), default=0)
    gathered = 2 * largest + largest  # current + prefetched layer, one layer's grads
    if engine == "deepspeed":
        bucket = ds.reduce_bucket_size if trainable_local else 0  # allocated at init
        step_copy = FP32 * min(trainable_local, ds.sub_group_size)
        return float(e * (gathered + bucket) + step_copy)
    # FSDP's root unit (embeddings, final norm, head) stays unsharded forward to backward
    return float(e * (gathered + outside))


def per_rank_bytes(
    engine: str,
    model: ModelInfo,
    dtype: str,
    world: int,
    batch: Batch,
    checkpointing: bool,
    rank: int = 0,
    ds: DsTuning = DsTuning(),
    selections: Mapping | None = None,
) -> dict[str, float]:
    """Every term of the module docstring for one rank, in bytes, plus `total`.

    Args:
        engine: `deepspeed`, `fsdp2`, `fsdp1` or `single`.
        model: The stage's model, trainable/selected set (`launcher.plan.model`).
        dtype: `model.dtype` of the spec.
        world: Number of ranks.
        batch: Tokens per micro-batch.
        checkpointing: `training.activation_checkpointing`.
        rank: Which rank.
        ds: ZeRO-3 settings (deepspeed only).
        selections: A real NeuronSet's entries to count mask indices exactly.

    Returns:
        `{term: bytes}` for `TERMS` and `"total"`.
    """
    if engine == "single" and world != 1:
        raise ValueError(f"engine.backend=single runs 1 process, not {world}")
    e = DTYPE_BYTES[dtype]
    lay = layout(engine, model, world, rank, ds)
    opt_elems = sum(lay.opt_numel.values())
    out = {
        "parameters": _param_bytes(engine, lay, e),
        "gradients": _grad_bytes(engine, lay, model, e, batch),
        "optimizer": 2.0 * FP32 * opt_elems + 4.0 * len(lay.opt_numel),
        "masks": mask_bytes(lay, selections) + neuronset_bytes(model),
        "activations": activation_bytes(model, e, batch, checkpointing),
        "buffers": buffer_bytes(engine, model, e, ds, opt_elems) + mask_step_bytes(lay),
    }
    out["total"] = sum(out[t] for t in TERMS)
    return out


def _param_bytes(engine: str, lay: Layout, e: int) -> float:
    if engine == "deepspeed":
        # DeepSpeed keeps a separate fp32 copy even for fp32 models: its "share the
        # partition" branch compares a torch.device with a device-name string, which
        # never matches (stage3.py `_create_fp32_partitions`; measured on CPU).
        return float(e * lay.stored + FP32 * lay.stored_trainable + e * lay.whole)
    if e == FP32 or engine not in LOWERS_FROZEN:
        return float(FP32 * lay.stored)
    if engine == "single":  # only products' weights: autocast casts them anyway
        low = sum(h.param.numel for h in lay.held if h.param.matmul and not h.param.trainable)
        return float(e * low + FP32 * (lay.stored - low))
    return float(e * (lay.stored - lay.stored_trainable) + FP32 * lay.stored_trainable)


def _grad_bytes(engine: str, lay: Layout, model: ModelInfo, e: int, batch: Batch) -> float:
    if engine == "deepspeed":
        return float(e * lay.stored_trainable)
    if engine == "fsdp2":
        unsharded = sum(p.numel for p in model.params if p.trainable)
        extra = FP32 * unsharded if batch.grad_accum > 1 else 0
        return float(FP32 * lay.stored_trainable + extra)
    if engine == "fsdp1":
        return float(FP32 * lay.stored_trainable)
    return float(FP32 * sum(p.numel for p in model.params if p.trainable))
