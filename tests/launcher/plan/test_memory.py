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
                         DsTuning(persistence_threshold=10))
    return {k: out[k] for k in ("parameters", "gradients", "optimizer", "masks")}


def test_deepspeed_partitions_masters_and_persistent_params():
    # P = ceil(60/3) = 20, ceil(6/3) = 2, ceil(30/3) = 10; the norm (6 < 10) is also
    # held whole. bf16 partitions 2*(20+2+10) + fp32 master 4*20 + whole 2*6.
    assert _terms("deepspeed", stage(), 3, 0) == {
        "parameters": 64 + 80 + 12, "gradients": 2 * 20, "optimizer": 8 * 20 + 4,
        "masks": 20 + 2 * 4,  # a bool per element of the small piece + the NeuronSet (int32)
    }
    # The last rank holds elements [40, 60) plus 0 elements of padding, same sizes.
    assert _terms("deepspeed", stage(), 3, 2) == _terms("deepspeed", stage(), 3, 0)


def test_fsdp2_pads_storage_but_steps_local_rows():
    # rows: ceil(10/3) = 4 -> 24 elements stored on every rank; rank 2 owns rows 8-9.
    # The trainable weight is fp32; the frozen norm and embedding are stored in bf16.
    r0, r2 = _terms("fsdp2", stage(), 3, 0), _terms("fsdp2", stage(), 3, 2)
    assert r0["parameters"] == r2["parameters"] == 4 * 24 + 2 * (2 + 12)
    assert _terms("fsdp2", stage(), 3, 0, dtype="float32")["parameters"] == 4 * (24 + 2 + 12)
    assert r0["gradients"] == r2["gradients"] == 4 * 24
    assert r0["optimizer"] == 8 * 24 + 4 and r2["optimizer"] == 8 * 12 + 4
    assert r0["masks"] == 24 + 8 and r2["masks"] == 12 + 8


def test_fsdp2_accumulation_keeps_unsharded_gradients():
    accum = Batch(3, 5, grad_accum=2)
    assert _terms("fsdp2", stage(), 3, 0, batch=accum)["gradients"] == 4 * 24 + 4 * 60


def test_fsdp1_units_train_whole_modules_and_pad_flat_shards():
    model = stage(fsdp1=True)
    norm = next(p for p in model.params if p.fqn == "l.0.n")
    assert norm.trainable and norm.selected == 0.0  # same module as the selected weight
    # unit l.0 = 66 elements -> shard 22 (fp32); frozen root unit (emb) = 30 -> shard
    # 10, stored in bf16.
    assert _terms("fsdp1", model, 3, 1) == {
        "parameters": 4 * 22 + 2 * 10, "gradients": 4 * 22, "optimizer": 8 * 22 + 4,
        "masks": 22 + 8,
    }
    held = {h.param.fqn: (h.start, h.stop) for h in layout("fsdp1", model, 3, 2).held}
    assert held == {"l.0.w": (44, 60), "l.0.n": (0, 6), "emb": (20, 30)}


def test_single_and_full_fine_tuning():
    # bf16: the trainable weight, the frozen norm and embedding all fp32 (only frozen
    # weights of matrix products are stored in bf16 on single)
    assert _terms("single", stage(), 1, 0) == {
        "parameters": 4 * 96, "gradients": 4 * 60, "optimizer": 8 * 60 + 4, "masks": 60 + 8,
    }
    frozen_product = with_trainable(
        hand_model(params=(ParamInfo("l.0.w", (10, 6), module="l.0", matmul=True),
                           ParamInfo("emb", (5, 6), module="emb"))), {"emb": (0.2, 0)})
    assert _terms("single", frozen_product, 1, 0)["parameters"] == 2 * 60 + 4 * 30
    full = _terms("single", hand_model(), 1, 0)
    assert full == {"parameters": 4 * 96, "gradients": 4 * 96, "optimizer": 8 * 96 + 3 * 4,
                    "masks": 0}


def _one(shape, selected, axis=0):
    return ModelInfo("hand", "llama", (ParamInfo("w", shape, True, selected, axis=axis),), (),
                     4, 8, 2, 10, True, True, 2)


def test_structured_mask_rule_matches_ncft_masks():
    # [512, 256] rows: int16 positions of the expected 10% of 512 rows; columns: the
    # 26 selected columns once, int16; all rows: no index at all.
    assert mask_bytes(layout("single", _one((512, 256), 0.1), 1, 0)) == pytest.approx(2 * 51.2)
    assert mask_bytes(layout("single", _one((512, 256), 0.1, 1), 1, 0)) == 2 * 26
    assert mask_bytes(layout("single", _one((512, 256), 1.0), 1, 0)) == 0
    # Column list shared by a parameter's pieces (ZeRO-3 at 3 ranks: still one piece
    # per rank) and int32 positions past 2^15 rows.
    assert mask_bytes(layout("deepspeed", _one((40000, 8), 0.5), 3, 0)) == pytest.approx(
        4 * 0.5 * (106667 // 8)  # elements [0, 106667): 13333 whole rows, 3 of the next
    )
    # Under DENSE_MAX_NUMEL (4096) elements: a bool per element.
    assert mask_bytes(layout("single", _one((63, 64), 0.1), 1, 0)) == 63 * 64


@pytest.mark.parametrize("engine,world", [("deepspeed", 3), ("fsdp2", 2), ("fsdp1", 3)])
def test_exact_mask_bytes_equal_mask_plan(engine, world):
    # The planner's exact count (meta device) against RankMasks.build on real tensors
    # for the same pieces: ZeRO-3 and FSDP1 cut rows mid-way, FSDP2 chunks whole rows.
    import torch

    from ncft.engine import Segment
    from ncft.masks.install import RankMasks
    from ncft.neuron_set import Selection

    shapes = {"l.0.w": (300, 77), "l.0.v": (77, 300), "l.0.b": (300,)}
    params = tuple(ParamInfo(f, s, module="l.0") for f, s in shapes.items())
    base = ModelInfo("hand", "llama", params, ("l.0",), 4, 8, 2, 10, True, True, 2)
    sel = {"l.0.w": Selection(0, torch.arange(3, 300, 9)),
           "l.0.v": Selection(1, torch.arange(0, 300, 7)),
           "l.0.b": Selection(0, torch.tensor([4]))}
    fractions = {f: (s.indices.numel() / shapes[f][s.axis], s.axis) for f, s in sel.items()}
    model = with_trainable(base, fractions, fsdp1_units=engine == "fsdp1")
    for rank in range(world):
        lay = layout(engine, model, world, rank)
        opt = {k: torch.zeros(n) for k, n in lay.opt_numel.items()}
        offsets: dict[str, int] = {}
        segs = []
        for h in lay.held:
            if h.opt is None:
                continue
            at = offsets.get(h.opt, 0) if engine == "fsdp1" else 0
            segs.append(Segment(h.param.fqn, h.param.shape, h.start, h.stop, opt[h.opt], at,
                                grad=lambda: None))
            offsets[h.opt] = at + h.stop - h.start
        plan = RankMasks.build(sel, segs)
        assert mask_bytes(lay, sel) == plan.nbytes() > 0, (engine, rank)
        assert mask_bytes(lay) == pytest.approx(plan.nbytes(), rel=0.2), (engine, rank)


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

    # The masked step's full-size update of the rank's largest (dense-bool) piece of
    # the selected weight: 2 fp32 per element (FSDP2 24 local elements, FSDP1 22,
    # ZeRO-3 20, single 60).
    step = {"fsdp2": 8 * 24, "fsdp1": 8 * 22, "deepspeed": 8 * 20, "single": 8 * 60}
    # two gathered layers + one layer's unsharded grads, plus the unsharded root unit
    assert buffers("fsdp2", 3) - step["fsdp2"] == 2 * (3 * 66 + 30)
    assert buffers("fsdp1", 3) - step["fsdp1"] == 2 * (3 * 66 + 30)
    # ZeRO-3: the layers, the reduce bucket, and an fp32 copy of the 20 trainable
    # partition elements at step
    assert buffers("deepspeed", 3) - step["deepspeed"] == 2 * (3 * 66 + 100) + 4 * 20
    # single: autocast's bf16 copy of every fp32 (trainable) weight, the 60 of the
    # selected one (frozen ones are stored in bf16 already); nothing in fp32
    assert buffers("single", 1) - step["single"] == 2 * 60
    assert buffers("single", 1, "float32") == step["single"]
