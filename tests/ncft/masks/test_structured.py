"""Structured (row/column index) masks against the dense bool masks they replace."""

import pytest
import torch

import ncft.masks.structured as structured
from ncft.engine import Segment
from ncft.masks.install import RankMasks
from ncft.masks.layout import segment_mask
from ncft.masks.optim import MaskedAdamW
from ncft.masks.structured import ALL, MaskBuilder
from ncft.neuron_set import Selection


@pytest.fixture
def always_structured(monkeypatch):
    """Hand-sized segments take the structured path too (no small-segment bool)."""
    monkeypatch.setattr(structured, "DENSE_MAX_NUMEL", 0)


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


def test_zero3_cut_rows_hand_case(always_structured):
    # [5, 4] weight, a ZeRO-3 partition holding elements 6..16: the end of row 1
    # (columns 2, 3), rows 2 and 3 whole, the start of row 4 (column 0).
    builder = MaskBuilder("cpu")
    rows = builder.segment("w", (5, 4), 6, 17, 0, torch.tensor([1, 3]))
    assert [(b.offset, b.rows, b.width, b.dim) for b in rows.blocks] == [
        (0, 1, 2, ALL),  # row 1's end, selected
        (2, 2, 4, 0),  # rows 2-3, of which row 3 (local row 1)
    ]
    assert rows.blocks[1].index.tolist() == [1]
    expected = torch.tensor([0, 0] + [1] * 4 + [0] * 4 + [1], dtype=torch.bool)
    assert torch.equal(rows.dense_frozen(), expected)

    cols = builder.segment("v", (5, 4), 6, 17, 1, torch.tensor([0, 3]))
    head, body, tail = cols.blocks
    assert (head.offset, head.width, head.positions().tolist()) == (0, 2, [1])  # column 3
    assert (body.offset, body.rows, body.positions().tolist()) == (2, 2, [0, 3])
    assert (tail.offset, tail.width, tail.positions().tolist()) == (10, 1, [0])
    # one column list for the parameter, shared by the three blocks, in int16
    shared = head.index.untyped_storage().data_ptr()
    assert body.index.untyped_storage().data_ptr() == tail.index.untyped_storage().data_ptr()
    assert body.index.untyped_storage().data_ptr() == shared
    assert body.index.dtype == torch.int16
    expected = torch.tensor([1, 0] + [0, 1, 1, 0] * 2 + [0], dtype=torch.bool)
    assert torch.equal(cols.dense_frozen(), expected)
    assert cols.num_trainable() == 6 and rows.num_trainable() == 6
    # Bookkeeping: 1 row position + 2 column positions, 2 bytes each.
    assert builder.nbytes() == 3 * 2


def test_positions_leave_a_stored_int64_index_alone(always_structured, monkeypatch):
    # Dimensions past 2^31 store int64, which `.long()` does not copy.
    monkeypatch.setattr(structured, "index_dtype", lambda size: torch.int64)
    mask = MaskBuilder("cpu").segment("v", (5, 40), 66, 170, 1, torch.tensor([0, 30]))
    head = mask.blocks[0]  # row 1 from column 26: column 30 at position 4
    assert head.positions().tolist() == [4] and head.positions().tolist() == [4]


@pytest.mark.parametrize("shape,axis", [((7, 5), 0), ((7, 5), 1), ((13,), 0), ((3, 11), 1)])
def test_every_cut_matches_segment_mask(always_structured, shape, axis):
    gen = torch.Generator().manual_seed(3)
    numel = torch.Size(shape).numel()
    structured_cuts = 0
    for density in (0.0, 0.3, 1.0):
        size = shape[axis]
        indices = torch.nonzero(torch.rand(size, generator=gen) < density).view(-1)
        for start in range(numel + 1):
            for stop in range(start, numel + 1):
                mask = MaskBuilder("cpu").segment("p", shape, start, stop, axis, indices)
                # A bool is kept only where the index would be as large.
                structured_cuts += mask.frozen is None
                reference = ~segment_mask(shape, start, stop, axis, indices)
                assert torch.equal(mask.dense_frozen(), reference), (start, stop)
                assert mask.num_trainable() == int((~reference).sum())
    assert structured_cuts > numel * numel // 2  # most cuts take the structured path


def test_small_or_index_heavy_segments_keep_a_bool():
    builder = MaskBuilder("cpu")
    small = builder.segment("w", (64, 63), 0, 4032, 0, torch.tensor([1]))  # < 4096
    assert small.frozen is not None and not small.blocks
    bias = builder.segment("b", (8192,), 0, 8192, 0, torch.arange(0, 8192, 2))  # 8 KiB index
    assert bias.frozen is not None
    assert builder.nbytes() == 4032 + 8192


def test_bad_selection_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        MaskBuilder("cpu").segment("w", (4, 3), 0, 12, 1, torch.tensor([3]))
    with pytest.raises(ValueError, match="axis"):
        MaskBuilder("cpu").segment("w", (4, 3), 0, 12, 2, torch.tensor([0]))
    with pytest.raises(ValueError, match="2-D"):
        MaskBuilder("cpu").segment("b", (4,), 0, 4, 1, torch.tensor([0]))


# --- the structured step and gradient masking against the dense-bool path -----------

ROWS, COLS = 97, 131  # 12,707 elements per weight: over DENSE_MAX_NUMEL
PAD = 5
A_START = ROWS * COLS // 2 + 7  # mid-row


def _packed(seed, device="cpu"):
    """Two weights and a bias cut ZeRO-3/FSDP1-style out of one flat tensor with padding:
    rank 1 of 2 for `a` (starting mid-row), all of `b`, and the bias's first half."""
    n = ROWS * COLS
    pieces = [("a", (ROWS, COLS), A_START, n), ("b", (COLS, ROWS), 0, n), ("c", (9000,), 0, 4500)]
    total = sum(stop - start for _, _, start, stop in pieces) + PAD
    gen = torch.Generator().manual_seed(seed)
    flat = torch.nn.Parameter(torch.randn(total, generator=gen).to(device))
    segs, offset = [], 0
    for fqn, shape, start, stop in pieces:
        lo, hi = offset, offset + stop - start
        grad = lambda lo=lo, hi=hi: flat.grad[lo:hi]  # noqa: E731
        segs.append(Segment(fqn, shape, start, stop, flat, lo, grad=grad))
        offset = hi
    return flat, segs


def _selection(gen, phase):
    pick = lambda size, p: torch.nonzero(torch.rand(size, generator=gen) < p).view(-1)  # noqa: E731
    if phase == 0:
        return {"a": Selection(1, pick(COLS, 0.1)), "b": Selection(0, pick(COLS, 0.1)),
                "c": Selection(0, pick(9000, 0.05))}
    # Row selection on `a` including the row the segment's start cuts (an "all" block).
    rows = torch.unique(torch.cat([pick(ROWS, 0.2), torch.tensor([A_START // COLS])]))
    return {"a": Selection(0, rows), "b": Selection(1, pick(ROWS, 0.05))}


def _grad(flat, frozen, gen):
    frozen = frozen.cpu()
    g = torch.randn(flat.numel(), generator=gen)
    g[:3] = -0.0
    bad = frozen & (torch.rand(flat.numel(), generator=gen) < 0.02)
    g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
        torch.arange(int(bad.sum())) % 3
    ]
    return g.to(flat.device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_structured_step_bit_identical_to_dense_bool(wd, device):
    gen = torch.Generator().manual_seed(11)
    ours, ours_segs = _packed(0, device)
    ref, _ = _packed(0, device)
    hyper = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    opt, ref_opt = MaskedAdamW([ours], **hyper), MaskedAdamW([ref], **hyper)
    # Task A trains everything (moments become non-zero), then two selections follow:
    # the second is installed over the first one's moments.
    for phase in (None, 0, 1):
        if phase is not None:
            sel = _selection(gen, phase)
            plan = RankMasks.build(sel, ours_segs)
            assert any(m.blocks for m in plan.masks), "structured path not exercised"
            assert all(t.device == ours.device for t in plan.owned)
            frozen = plan.frozen[id(ours)][1]
            opt.set_frozen(plan.tensor_masks)
            ref_opt.set_frozen({id(ref): (ref, frozen)})  # the dense-bool path
        for _ in range(3):
            before = ours.detach().clone()
            g = _grad(ours, frozen if phase is not None else torch.zeros_like(before).bool(), gen)
            ours.grad, ref.grad = g.clone(), g.clone()
            if phase is not None:
                plan.apply_to_grads()
                # The reference for gradient masking; padding is in no segment, so
                # apply_to_grads leaves it (the step never moves it).
                ref.grad[:-PAD].masked_fill_(frozen[:-PAD], 0.0)
                assert torch.equal(_bits(ours.grad), _bits(ref.grad))
                assert torch.isfinite(ours.grad[:-PAD]).all()
                # Stale non-finite gradients reach the step unmasked too (moments only).
                ours.grad, ref.grad = g.clone(), g.clone()
            opt.step()
            ref_opt.step()
            assert torch.equal(_bits(ours), _bits(ref))
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(_bits(opt.state[ours][key]), _bits(ref_opt.state[ref][key]))
            if phase is not None:
                assert torch.equal(_bits(ours)[frozen], _bits(before)[frozen])
                assert (ours.detach()[~frozen] != before[~frozen]).any()


def test_plan_bytes_are_per_row_and_column():
    _, segs = _packed(0)
    sel = {"a": Selection(1, torch.arange(0, COLS, 10)), "b": Selection(0, torch.tensor([5, 90]))}
    plan = RankMasks.build(sel, segs)
    # a: its 14 columns in int16; b: 2 row positions in int16; c: unselected, nothing.
    assert plan.nbytes() == 2 * 14 + 2 * 2
    assert plan.num_trainable_local() == int((~plan.frozen[id(segs[0].opt_param)][1]).sum())
