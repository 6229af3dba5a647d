"""The library API in one process: attach, save/load, merge, and the errors it gives.

The distributed halves (ZeRO-3 under HF Trainer, FSDP2 under accelerate, each checked
against `ncft masked-train`) are in tests/ncft/test_adapter_dist.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ncft
from ncft import sparse_delta
from ncft.arch import get_adapter, make_projection, row_entries
from ncft.neuron_set import NeuronSet, Selection
from tests.support.spawn import REPO, worker_env
from tests.support.tiny import tiny_llama


def _nset(model) -> NeuronSet:
    """Units with gate/up biases and down columns, plus NeFT rows of one attention matrix."""
    blocks = get_adapter(model).mlp_blocks(model)
    units = NeuronSet.from_units(blocks, {0: torch.tensor([0, 5, 17]), 1: torch.tensor([2, 30])})
    rows = row_entries(make_projection(model, "model.layers.1.self_attn.q_proj", "attn"),
                       torch.tensor([1, 7]))
    return units.union(NeuronSet({k: Selection(*v) for k, v in rows.items()}))


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(seed))


def _train(model, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_import_ncft_is_cheap():
    code = ("import sys, ncft; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'deepspeed', 'accelerate', 'launcher')]; "
            "print(heavy); assert not heavy, heavy; ncft.attach; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('deepspeed', "
            "'launcher') or m.startswith('torch.distributed.fsdp')]")
    proc = subprocess.run([sys.executable, "-c", code], env=worker_env(), cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_attach_trains_only_deltas_and_same_forward():
    base, model = tiny_llama(0).eval(), tiny_llama(0).eval()
    out = ncft.attach(model, _nset(model))
    assert out is model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(sparse_delta.is_delta_fqn(n) for n in trainable)
    ids = _ids()
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits,
                               atol=1e-6, rtol=0)


def test_save_load_merge_roundtrip(tmp_path):
    model = tiny_llama(0)
    nset = _nset(model)
    ncft.attach(model, nset)
    _train(model)
    ncft.save_adapter(model, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {"adapter.safetensors", "adapter.json", "neurons.safetensors",
                     "neurons.json"}
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    selected = sum(int(nset.dense_mask(n, model.get_parameter(n).shape).sum())
                   for n in nset.entries)
    assert sum(v.numel() for v in saved.values()) == selected  # deltas only, no model

    ids = _ids(7)
    trained = model.eval()(input_ids=ids).logits
    loaded = ncft.load_adapter(tiny_llama(0).eval(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=0, rtol=0)

    merged = ncft.merge(loaded)
    assert not sparse_delta.installed(merged) and not hasattr(merged, "ncft_adapter")
    assert all(p.requires_grad for p in merged.parameters())  # as before attach
    torch.testing.assert_close(merged(input_ids=ids).logits, trained, atol=1e-5, rtol=0)
    base = dict(tiny_llama(0).named_parameters())
    for name, p in merged.named_parameters():
        outside = ~nset.dense_mask(name, p.shape)
        assert torch.equal(p.detach()[outside], base[name].detach()[outside]), name
        if name in nset.entries:
            assert not torch.equal(p.detach(), base[name].detach()), name
    merged.save_pretrained(tmp_path / "merged")
    assert not [k for k in load_file(tmp_path / "merged" / "model.safetensors")
                if "ncft" in k]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, merged(input_ids=ids).logits,
                               atol=0, rtol=0)


def test_neuron_set_for_another_shape_is_refused():
    model = tiny_llama(0)
    big = tiny_llama(0, layers=3)
    with pytest.raises(ValueError, match="does not have"):
        ncft.attach(model, _nset(big).union(NeuronSet(
            {"model.layers.2.mlp.up_proj.weight": Selection(0, torch.tensor([1]))})))
    wide = NeuronSet({"model.layers.0.mlp.up_proj.weight": Selection(0, torch.tensor([40]))})
    with pytest.raises(ValueError, match="another shape"):
        ncft.attach(model, wide)
    assert not sparse_delta.installed(model)


def test_attach_twice_is_refused():
    model = tiny_llama(0)
    ncft.attach(model, _nset(model))
    with pytest.raises(ValueError, match="already has ncft deltas"):
        ncft.attach(model, _nset(model))


def test_merge_and_save_before_attach_are_refused(tmp_path):
    with pytest.raises(ValueError, match="merge: the model has no ncft adapter"):
        ncft.merge(tiny_llama(0))
    with pytest.raises(ValueError, match="save_adapter: the model has no ncft adapter"):
        ncft.save_adapter(tiny_llama(0), tmp_path / "a")


def test_adapter_into_wrong_base_is_refused(tmp_path):
    model = tiny_llama(0)
    ncft.attach(model, _nset(model))
    ncft.save_adapter(model, tmp_path / "adapter")
    other = tiny_llama(seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="wrong base model"):
        ncft.load_adapter(other, tmp_path / "adapter")
    assert not sparse_delta.installed(other) and not hasattr(other, "ncft_adapter")
    with pytest.raises(ValueError, match="wrong base model"):
        ncft.load_adapter(tiny_llama(0, mlp_bias=False), tmp_path / "adapter")
    # bf16 copy of the right base: compared approximately, accepted
    ncft.load_adapter(tiny_llama(0).to(torch.bfloat16), tmp_path / "adapter")


def test_attach_after_wrapping_is_refused():
    model = tiny_llama(0)
    model.ds_inflight_param_registry = {}  # what deepspeed.initialize leaves
    with pytest.raises(ValueError, match="before the Trainer"):
        ncft.attach(model, _nset(model))
