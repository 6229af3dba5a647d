import math

import pytest
import torch

from ncft.masks.optim import SPARSE_MAX_FRACTION, SPARSE_MIN_NUMEL, MaskedAdamW


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(11))]


def _grads(params, step):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_unmasked_matches_torch_adamw():
    ours, ref = _params(), _params()
    opt = MaskedAdamW(ours, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    ref_opt = torch.optim.AdamW(
        ref, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6, foreach=False
    )
    for step in range(10):
        _grads(ours, step)
        _grads(ref, step)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_frozen_elements_bit_identical_with_decay_and_stale_moments():
    params = _params()
    opt = MaskedAdamW(params, lr=1e-1, weight_decay=0.1)
    w = params[0]
    for step in range(3):  # task A trains everything: moments become non-zero
        _grads(params, step)
        opt.step()
    frozen = torch.zeros(w.numel(), dtype=torch.bool)
    frozen[: w.numel() // 2] = True  # task B freezes the first half, grads not masked
    opt.set_frozen({id(w): (w, frozen)})
    before = w.detach().clone()
    for step in range(3, 8):
        _grads(params, step)
        opt.step()
    flat_before, flat_after = before.view(-1), w.detach().view(-1)
    assert torch.equal(flat_after[frozen], flat_before[frozen])
    assert (flat_after[~frozen] != flat_before[~frozen]).all()


def test_frozen_elements_survive_non_finite_updates():
    w = torch.nn.Parameter(torch.ones(4))
    opt = MaskedAdamW([w], lr=1e-2)
    frozen = torch.tensor([True, True, False, False])
    opt.set_frozen({id(w): (w, frozen)})
    w.grad = torch.tensor([float("nan"), float("inf"), 1.0, 1.0])
    opt.step()
    assert torch.equal(w.detach()[:2], torch.ones(2))


# --- index path (sparse masks) against the dense arithmetic it replaced ---------------


def _bits(t):
    # Bit patterns: distinguishes -0.0 from 0.0 and compares nan payloads exactly.
    return t.detach().contiguous().view(torch.int32)


def _reference_update(p, state, frozen, lr, betas, eps, wd):
    """MaskedAdamW._update as it was before the index path: a full-size update with
    the frozen slots cleared by masked_fill_ (kept verbatim as the reference)."""
    beta1, beta2 = betas
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    step = float(state["step"])
    grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    update = torch.div(exp_avg, denom, out=denom).mul_(step_size)
    if wd:
        update.add_(p, alpha=lr * wd)
    if frozen is not None:
        update.masked_fill_(frozen.view(update.shape), 0.0)
    p.sub_(update)


def _mask(shape, kind, density, gen):
    """Frozen mask (True = frozen) over the flat tensor, `density` of it trainable."""
    numel = math.prod(shape)
    if kind == "elements":
        trainable = torch.rand(numel, generator=gen) < density
    elif kind == "rows":  # neuron rows, as a NeuronSet selects them
        rows = torch.rand(shape[0], generator=gen) < density
        trainable = rows[:, None].expand(shape).reshape(-1)
    else:  # columns
        cols = torch.rand(shape[-1], generator=gen) < density
        trainable = cols.expand(shape).reshape(-1)
    return ~trainable


# (shape, mask kind, trainable density per phase). Odd sizes so gathered subsets land
# on every position relative to the vector width; 64 x 1024 is exactly the threshold.
CASES = [
    ((300, 229), "rows", (0.05, 0.2)),
    ((229, 300), "cols", (0.05, 0.01)),
    ((70_001,), "elements", (0.25, 0.03)),
    ((64, 1024), "elements", (0.1, 0.6)),  # sparse, then dense after the change
    ((257, 263), "elements", (0.5, 0.05)),  # dense, then sparse
    ((199, 331), "rows", (0.0, 1.0)),  # all frozen, then all trainable (dense)
    ((7, 5), "elements", (0.1, 0.1)),  # tiny: dense path whatever the density
    ((4099,), "elements", (0.2, 0.2)),
]


def _uses_index(frozen):
    trainable = int((~frozen).sum())
    return frozen.numel() >= SPARSE_MIN_NUMEL and trainable <= SPARSE_MAX_FRACTION * frozen.numel()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_index_path_bit_identical_to_dense_reference(wd):
    gen = torch.Generator().manual_seed(7)
    hyper = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    init = [torch.randn(shape, generator=gen) for shape, _, _ in CASES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [t.clone() for t in init]
    opt = MaskedAdamW(ours, weight_decay=wd, **hyper)
    ref_state = [{} for _ in ref]
    used = set()
    for phase in range(2):
        masks = [_mask(shape, kind, dens[phase], gen) for shape, kind, dens in CASES]
        opt.set_frozen({id(p): (p, m) for p, m in zip(ours, masks)})
        for p, m in zip(ours, masks):
            assert (id(p) in opt._trainable_index) == _uses_index(m)
            if _uses_index(m):
                used.add(p.numel())
        for _ in range(3):
            before = [p.detach().clone() for p in ours]
            for p, r, m in zip(ours, ref, masks):
                g = torch.randn(p.shape, generator=gen)
                g.view(-1)[:3] = -0.0  # signed zeros must survive too
                # Non-finite gradients in some frozen slots.
                bad = m & (torch.rand(m.shape, generator=gen) < 0.01)
                g.view(-1)[bad] = torch.tensor([float("nan"), float("inf"), -float("inf")])[
                    torch.arange(int(bad.sum())) % 3
                ]
                p.grad, r.grad = g.clone(), g.clone()
            opt.step()
            for r, s, m in zip(ref, ref_state, masks):
                _reference_update(r, s, m, wd=wd, **hyper)
            for p, r, s, m, b in zip(ours, ref, ref_state, masks, before):
                assert torch.equal(_bits(p), _bits(r)), p.shape
                assert torch.equal(_bits(p).view(-1)[m], _bits(b).view(-1)[m])
                st = opt.state[p]
                assert torch.equal(_bits(st["exp_avg"]), _bits(s["exp_avg"]))
                assert torch.equal(_bits(st["exp_avg_sq"]), _bits(s["exp_avg_sq"]))
                # The state format checkpoints read and write.
                assert st["exp_avg"].shape == st["exp_avg_sq"].shape == p.shape
                assert st["step"].shape == () and st["step"].dtype == torch.float32
    assert len(used) >= 4, "too few tensors exercised the index path"


def test_foreach_moments_equal_the_per_tensor_loop():
    # One foreach call per moment operation over all tensors (fewer kernel launches on
    # a GPU) must give the per-tensor loop's bits, masked or not.
    runs = []
    for foreach in (True, False):
        params = _params()
        opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
        opt.foreach_moments = foreach
        frozen = torch.zeros(params[0].numel(), dtype=torch.bool)
        frozen[::3] = True
        opt.set_frozen({id(params[0]): (params[0], frozen)})
        for step in range(5):
            _grads(params, step)
            opt.step()
        runs.append([p.detach().clone() for p in params] +
                    [opt.state[p][k].clone() for p in params for k in ("exp_avg", "exp_avg_sq")])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
