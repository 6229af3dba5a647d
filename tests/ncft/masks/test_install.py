import pytest
import torch

from ncft.engine import Segment
from ncft.masks.install import RankMasks, freeze_unselected
from ncft.neuron_set import NeuronSet, Selection


def _segments():
    """Two parameters packed into one flat tensor with tail padding (FSDP1/ZeRO-3 shape)."""
    flat = torch.zeros(20)
    flat.grad = torch.ones(20)
    w = Segment("w", (4, 3), 5, 12, flat, 0, grad=lambda: flat.grad[0:7])
    b = Segment("b", (4,), 1, 4, flat, 7, grad=lambda: flat.grad[7:10])
    return flat, [w, b]


def test_plan_layout_and_grad_masking():
    flat, segs = _segments()
    sel = NeuronSet({"w": Selection(1, torch.tensor([2])), "b": Selection(0, torch.tensor([3]))})
    plan = RankMasks.build(sel.entries, segs)
    frozen = plan.frozen[id(flat)][1]
    # w elements 5..11 -> columns 2,0,1,2,0,1,2 ; selected col 2 at positions 0, 3, 6
    expected_w = torch.tensor([False, True, True, False, True, True, False])
    assert torch.equal(frozen[:7], expected_w)
    assert torch.equal(frozen[7:10], torch.tensor([True, True, False]))  # b[1..3], b[3] picked
    assert frozen[10:].all(), "padding must be frozen"
    plan.apply_to_grads()
    assert torch.equal(flat.grad[:10], (~frozen[:10]).float())
    assert plan.num_trainable_local() == 4


def test_masks_live_on_the_optimizer_tensor_device():
    # Meta stands in for CUDA here: a mask left on CPU would meet a GPU update in the
    # step's select (a device mismatch the GPU-marked tests would only see on a GPU).
    flat = torch.zeros(20, device="meta")
    segs = [Segment("w", (4, 3), 5, 12, flat, 0, grad=lambda: None)]
    plan = RankMasks.build(NeuronSet({"w": Selection(1, torch.tensor([2]))}).entries, segs)
    assert plan.frozen[id(flat)][1].device.type == "meta"


def test_unselected_parameter_is_fully_frozen():
    flat, segs = _segments()
    plan = RankMasks.build(NeuronSet({"w": Selection(0, torch.tensor([1]))}).entries, segs)
    assert plan.frozen[id(flat)][1][7:10].all()


def test_selection_of_untrained_parameter_is_an_error():
    _, segs = _segments()
    with pytest.raises(ValueError, match="does not train"):
        RankMasks.build({"other.weight": Selection(0, torch.tensor([0]))}, segs)


def test_freeze_unselected():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert freeze_unselected(model, ["1.weight"]) == ["1.weight"]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, False]
    with pytest.raises(ValueError, match="lacks"):
        freeze_unselected(model, ["2.weight"])


def test_sparse_segments_mask_grads_by_index_like_masked_fill():
    # Large segments packed into one flat tensor with padding; the 3-column selection
    # is sparse (index path), the 3-of-4-rows one dense (torch.where path).
    rows, cols = 300, 229  # 68,700 elements, over the index-path threshold
    n_w = rows * cols
    flat = torch.zeros(n_w + 400 + 8)
    flat.grad = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(0))
    w = Segment("w", (rows, cols), 0, n_w, flat, 0, grad=lambda: flat.grad[0:n_w])
    b = Segment("b", (4, 100), 0, 400, flat, n_w, grad=lambda: flat.grad[n_w : n_w + 400])
    sel = {
        "w": Selection(1, torch.tensor([0, 17, 200])),
        "b": Selection(0, torch.tensor([0, 1, 3])),
    }
    plan = RankMasks.build(sel, [w, b])
    assert plan.grad_index[0] is not None and plan.grad_index[1] is None
    frozen = plan.frozen[id(flat)][1]
    bad = frozen.clone()
    bad[::3] = False
    bad[-8:] = False  # padding is never written, by either approach
    flat.grad[bad] = float("nan")
    flat.grad[bad & (torch.arange(flat.numel()) % 2 == 0)] = -float("inf")
    flat.grad[~frozen & (torch.arange(flat.numel()) % 5 == 0)] = -0.0  # must stay -0.0
    expected = flat.grad.clone()
    for view, f in zip((expected[:n_w], expected[n_w : n_w + 400]), plan.grad_frozen):
        view.masked_fill_(f, 0.0)  # the approach the index path replaced
    plan.apply_to_grads()
    assert torch.equal(flat.grad.view(torch.int32), expected.view(torch.int32))
    assert torch.isfinite(flat.grad).all()
    assert plan.num_trainable_local() == 3 * rows + 300
