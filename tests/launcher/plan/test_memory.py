"""The planner's arithmetic on hand-computed cases (no model, no process group)."""

from __future__ import annotations

import pytest

from launcher.plan.memory import (
    Batch,
    DsTuning,
    activation_bytes,
    layout,
    mask_bytes,
    per_rank_bytes,
)
from launcher.plan.model import ModelInfo, ParamInfo, with_trainable

BATCH = Batch(micro_batch=3, seq_len=5)


def hand_model(**extra) -> ModelInfo:
    """One layer `l.0` with a [10, 6] weight and a [6] norm, plus a [5, 6] embedding."""
    params = (
        ParamInfo("l.0.w", (10, 6), module="l.0"),
        ParamInfo("l.0.n", (6,), module="l.0"),
        ParamInfo("emb", (5, 6), module="emb"),
    )
    base = dict(source="hand", model_type="llama", params=params, layers=("l.0",), hidden=4,
                ffn=8, kv_width=2, vocab=10, gated=True, fused_attention=True, heads=2)
    base.update(extra)
    return ModelInfo(**base)


def stage(fsdp1: bool = False) -> ModelInfo:
    # 2 of the weight's 10 rows selected; the norm and the embedding frozen.
    return with_trainable(hand_model(), {"l.0.w": (0.2, 0)}, fsdp1_units=fsdp1)


def _terms(engine, model, world, rank, dtype="bfloat16", batch=BATCH):
    out = per_rank_bytes(engine, model, dtype, world, batch, False, rank,
                         DsTuning(persistence_threshold=10))  # fmt: skip
    return {k: out[k] for k in ("parameters", "gradients", "optimizer", "masks")}


def test_deepspeed_partitions_masters_and_persistent_params():
    # P = ceil(60/3) = 20, ceil(6/3) = 2, ceil(30/3) = 10; the norm (6 < 10) is also
    # held whole. bf16 partitions 2*(20+2+10) + fp32 master 4*20 + whole 2*6.
    assert _terms("deepspeed", stage(), 3, 0) == {
        "parameters": 64 + 80 + 12, "gradients": 2 * 20, "optimizer": 8 * 20 + 4,
        "masks": 20 + 2 * 8,  # bool per partition element + the NeuronSet's 2 int64
    }
    # The last rank holds elements [40, 60) plus 0 elements of padding, same sizes.
    assert _terms("deepspeed", stage(), 3, 2) == _terms("deepspeed", stage(), 3, 0)


def test_fsdp2_pads_storage_but_steps_local_rows():
    # rows: ceil(10/3) = 4 -> 24 elements stored on every rank; rank 2 owns rows 8-9.
    r0, r2 = _terms("fsdp2", stage(), 3, 0), _terms("fsdp2", stage(), 3, 2)
    assert r0["parameters"] == r2["parameters"] == 4 * (24 + 2 + 12)
    assert r0["gradients"] == r2["gradients"] == 4 * 24
    assert r0["optimizer"] == 8 * 24 + 4 and r2["optimizer"] == 8 * 12 + 4
    assert r0["masks"] == 24 + 16 and r2["masks"] == 12 + 16


def test_fsdp2_accumulation_keeps_unsharded_gradients():
    accum = Batch(3, 5, grad_accum=2)
    assert _terms("fsdp2", stage(), 3, 0, batch=accum)["gradients"] == 4 * 24 + 4 * 60


def test_fsdp1_units_train_whole_modules_and_pad_flat_shards():
    model = stage(fsdp1=True)
    norm = next(p for p in model.params if p.fqn == "l.0.n")
    assert norm.trainable and norm.selected == 0.0  # same module as the selected weight
    # unit l.0 = 66 elements -> shard 22; root unit (emb) = 30 -> shard 10.
    assert _terms("fsdp1", model, 3, 1) == {
        "parameters": 4 * (22 + 10), "gradients": 4 * 22, "optimizer": 8 * 22 + 4,
        "masks": 22 + 16,
    }
    held = {h.param.fqn: (h.start, h.stop) for h in layout("fsdp1", model, 3, 2).held}
    assert held == {"l.0.w": (44, 60), "l.0.n": (0, 6), "emb": (20, 30)}


def test_single_and_full_fine_tuning():
    assert _terms("single", stage(), 1, 0) == {
        "parameters": 4 * 96, "gradients": 4 * 60, "optimizer": 8 * 60 + 4, "masks": 60 + 16,
    }
    full = _terms("single", hand_model(), 1, 0)
    assert full == {"parameters": 4 * 96, "gradients": 4 * 96, "optimizer": 8 * 96 + 3 * 4,
                    "masks": 0}  # fmt: skip


@pytest.mark.parametrize("selected,indexed", [(0.1, True), (0.25, True), (0.3, False)])
def test_sparse_index_rule_matches_ncft_masks(selected, indexed):
    # [512, 256] = 131,072 elements >= 2^16: the plan's segment index and the
    # optimizer's tensor index each hold one int64 per selected element if <= 25%.
    model = ModelInfo("hand", "llama", (ParamInfo("w", (512, 256), True, selected),), (),
                      4, 8, 2, 10, True, True, 2)  # fmt: skip
    expected = 131072 + (2 * 8 * selected * 131072 if indexed else 0)
    assert mask_bytes(layout("single", model, 1, 0)) == pytest.approx(expected)
    # Too small for an index however sparse.
    small = ModelInfo("hand", "llama", (ParamInfo("w", (255, 256), True, 0.1),), (),
                      4, 8, 2, 10, True, True, 2)  # fmt: skip
    assert mask_bytes(layout("single", small, 1, 0)) == 255 * 256


def test_activation_formula_by_hand():
    # gated, e=2, h=4, kv=2, d_ff=8: per token and layer 2*(4+4)*4 + 2*(8+4) + 4*2*8
    # = 64 + 24 + 64 = 152; 15 tokens -> 2280. Head: 15 * ((4+4)*4 + (2+4+4)*10) = 1980.
    model = hand_model()
    assert activation_bytes(model, 2, BATCH, checkpointing=False) == 2280 + 1980
    # checkpointing: the layer input (2*4 per token) kept + one layer live again.
    assert activation_bytes(model, 2, BATCH, checkpointing=True) == 2 * 4 * 15 + 2280 + 1980
    # without the logits' fp32 gradient (4 per vocabulary entry and token)
    assert activation_bytes(model, 2, BATCH, False, transient=False) == 2280 + 1980 - 4 * 10 * 15
    # eager attention (Bloom) adds (4+e) * heads * s per token and layer.
    eager = hand_model(fused_attention=False)
    extra = (4 + 2) * 2 * 5 * 15
    fused = activation_bytes(model, 2, BATCH, False)
    assert activation_bytes(eager, 2, BATCH, False) == fused + extra


def test_total_is_the_sum_and_single_refuses_ranks():
    out = per_rank_bytes("fsdp2", stage(), "bfloat16", 3, BATCH, False)
    assert out["total"] == sum(v for k, v in out.items() if k != "total")
    with pytest.raises(ValueError, match="single"):
        per_rank_bytes("single", stage(), "float32", 2, BATCH, False)
    with pytest.raises(ValueError, match="engine.backend"):
        layout("zero2", stage(), 2, 0)


def test_buffer_estimate_by_hand():
    # Layer l.0 holds 66 elements, 30 are outside any layer; bf16 compute.
    def buffers(engine, world, dtype="bfloat16"):
        tuning = DsTuning(persistence_threshold=10, reduce_bucket_size=100)
        model = stage(fsdp1=engine == "fsdp1")
        return per_rank_bytes(engine, model, dtype, world, BATCH, False, 0, tuning)["buffers"]

    # two gathered layers + one layer's unsharded grads, plus the unsharded root unit
    assert buffers("fsdp2", 3) == buffers("fsdp1", 3) == 2 * (3 * 66 + 30)
    # ZeRO-3: the layers, the reduce bucket, and an fp32 copy of the 20 trainable
    # partition elements at step
    assert buffers("deepspeed", 3) == 2 * (3 * 66 + 100) + 4 * 20
    # single: autocast's bf16 copy of every weight; nothing in fp32
    assert buffers("single", 1) == 2 * 96 and buffers("single", 1, "float32") == 0
