import torch

from ncft.masks.optim import MaskedAdamW


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
