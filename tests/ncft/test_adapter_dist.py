"""The library API under real launchers on 2 CPU ranks, against `ncft masked-train`.

Three launched jobs on tiny-random-llama, 3 steps on the shipped SST-2 rows (seq 64,
micro-batch 2 per rank, AdamW lr 1e-2, weight decay 0.1, clip 1.0, constant rate):

* examples/hf_trainer_neurons.py under `torchrun` with HF `Trainer` and a DeepSpeed
  ZeRO-3 config dict (weights partitioned at `from_pretrained`; `attach` builds the
  deltas from the partitions);
* examples/accelerate_neurons.py `--fsdp2` under `torchrun` (accelerate falls back to
  DDP on CPU, so the example shards with `fully_shard` as accelerate's FSDP2 plugin
  does; the accelerate FSDP2 path itself is the `gpu` test below). It selects its own
  neurons with `ncft.score` on 2 ranks;
* the reference: `ncft masked-train --backend deepspeed --nproc 2` on the same text,
  NeuronSet, order and optimizer settings (masked full matrices, not deltas).
  masked-train on the other engines equals it (tests/ncft/test_sparse_delta_dist.py).

The ZeRO-3 run records that every weight was a partition when `attach` ran, and
`load_adapter` here compares an exact digest of the base's selected elements with the
one `attach` took from those partitions: the partition reads are bit-exact.

Tolerance: merged weights equal the reference within atol 1e-6 (fp32). Three steps at
lr 1e-2 move selected weights by up to 3e-2; the largest difference measured was
4.7e-8 (summation order of the sparse forward and of torch's AdamW vs MaskedAdamW).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ncft
from ncft.neuron_set import NeuronSet
from tests.support.spawn import REPO, torchrun, worker_env

pytestmark = pytest.mark.dist

sys.path.insert(0, str(REPO / "examples"))
import neurons_common as common  # noqa: E402

# Settings both `ncft masked-train` and the examples take; the examples add the rest.
SETTINGS = ["--steps", "3", "--lr", "1e-2", "--seq-len", "64", "--micro-batch-size", "2",
            "--weight-decay", "0.1", "--grad-clip", "1.0", "--seed", "0"]
TRAIN = ["--model", "tiny-random-llama", "--rows", "64", *SETTINGS]
FRACTION = 0.25
ATOL = 1e-6
RUNS = ("hf_zero3", "accelerate_fsdp2")


def _model_dir() -> str:
    return common.model_dir("tiny-random-llama")


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_model_dir()).eval()


def _score_here() -> NeuronSet:
    """`ncft.score` in this one process on the rows the examples score on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    return ncft.score(_base(), common.score_loader(tokenizer, 64, 0, 1), fraction=FRACTION)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    neurons = _score_here()
    neurons.save(out / "neurons.safetensors")
    torchrun(REPO / "examples" / "hf_trainer_neurons.py", 2,
             ["--engine", "zero3", "--neurons", str(out / "neurons.safetensors"),
              "--out", str(out / "hf_zero3"), *TRAIN])
    torchrun(REPO / "examples" / "accelerate_neurons.py", 2,
             ["--fsdp2", "--fraction", str(FRACTION), "--out", str(out / "accelerate_fsdp2"),
              *TRAIN])
    ref = subprocess.run(
        [sys.executable, "-m", "launcher", "masked-train", "--model", _model_dir(),
         "--data", str(out / "hf_zero3" / "train.txt"), "--out", str(out / "reference"),
         "--nproc", "2", "--backend", "deepspeed",
         "--neurons", str(out / "neurons.safetensors"),
         *SETTINGS],
        env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-6000:]
    return out


def _merged(out: Path, run: str):
    """A fresh process's view: base + load_adapter, then merge."""
    return ncft.merge(ncft.load_adapter(_base(), out / run / "adapter"))


def test_both_runs_trained_on_the_reference_text(runs):
    text = (runs / "hf_zero3" / "train.txt").read_text()
    assert (runs / "accelerate_fsdp2" / "train.txt").read_text() == text


def test_score_on_two_ranks_equals_one_process(runs):
    two = NeuronSet.load(runs / "accelerate_fsdp2" / "adapter" / "neurons.safetensors")
    one = NeuronSet.load(runs / "neurons.safetensors")
    assert two.entries == one.entries and two.num_selected() > 0


@pytest.mark.parametrize("run", RUNS)
def test_training_equals_masked_train(runs, run):
    reference = load_file(runs / "reference" / "model" / "model.safetensors")
    base = load_file(Path(_model_dir()) / "model.safetensors")
    merged = _merged(runs, run).state_dict()
    assert set(merged) >= set(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(merged[name], ref, atol=ATOL, rtol=0)
    moved = max(float((reference[n] - base[n]).abs().max()) for n in reference)
    assert moved > 100 * ATOL  # the selection really trained


@pytest.mark.parametrize("run", RUNS)
def test_unselected_merged_elements_are_bit_identical(runs, run):
    nset = NeuronSet.load(runs / "neurons.safetensors")
    base = load_file(Path(_model_dir()) / "model.safetensors")
    merged = _merged(runs, run).state_dict()
    for name, before in base.items():
        outside = ~nset.dense_mask(name, before.shape)
        assert torch.equal(merged[name][outside], before[outside]), name


@pytest.mark.parametrize("run", RUNS)
def test_grad_and_optimizer_bytes_follow_the_selection(runs, run):
    for rank in range(2):
        report = json.loads((runs / run / f"memory_rank{rank}.json").read_text())
        assert report["world_size"] == 2
        if run == "hf_zero3":  # attach really read ZeRO-3 partitions
            assert report["partitioned_at_load"] is True
        assert 0 < report["selected_fraction"] < 0.5
        # Selected fraction of full fine-tuning on the same engine and rank.
        assert report["grad_opt_bytes"] <= 1.2 * report["selected_fraction"] * \
            report["full_ft_grad_opt_bytes"], report


@pytest.mark.parametrize("run", RUNS)
def test_reloaded_adapter_gives_the_trained_logits(runs, run):
    probe = load_file(runs / run / "probe_logits.safetensors")
    model = ncft.load_adapter(_base(), runs / run / "adapter")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=0)
    size = sum(f.stat().st_size for f in (runs / run / "adapter").iterdir())
    model_size = (Path(_model_dir()) / "model.safetensors").stat().st_size
    assert size < model_size / 2  # deltas and indices, not a model


@pytest.mark.parametrize("run", RUNS)
def test_merged_model_loads_with_plain_from_pretrained(runs, run, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = _merged(runs, run)
    merged.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not [k for k in saved if "ncft" in k]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = load_file(runs / run / "probe_logits.safetensors")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate's FSDP2 needs 2 GPUs")
@pytest.mark.parametrize("script,extra", [
    ("accelerate_neurons.py", []),
    ("hf_trainer_neurons.py", ["--engine", "fsdp2"]),
])
def test_accelerate_fsdp2_on_gpus(tmp_path, script, extra):
    """The accelerate-launched FSDP2 paths CPU ranks cannot take, against masked-train."""
    neurons = _score_here()
    neurons.save(tmp_path / "neurons.safetensors")
    config = REPO / "examples" / "accelerate" / "fsdp2.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", "2", str(REPO / "examples" / script), *extra,
           "--neurons", str(tmp_path / "neurons.safetensors"), "--out", str(tmp_path / "run"),
           *TRAIN]
    proc = subprocess.run(cmd, env=worker_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ref = subprocess.run(
        [sys.executable, "-m", "launcher", "masked-train", "--model", _model_dir(),
         "--data", str(tmp_path / "run" / "train.txt"), "--out", str(tmp_path / "ref"),
         "--nproc", "2", "--backend", "fsdp2", "--neurons", str(tmp_path / "neurons.safetensors"),
         *SETTINGS],
        env=worker_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-6000:]
    reference = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    merged = _merged(tmp_path, "run").state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, atol=1e-5, rtol=0)
    for rank in range(2):
        report = json.loads((tmp_path / "run" / f"memory_rank{rank}.json").read_text())
        assert report["grad_opt_bytes"] <= 1.2 * report["selected_fraction"] * \
            report["full_ft_grad_opt_bytes"]
    assert math.isfinite(float(load_file(tmp_path / "run" / "probe_logits.safetensors")
                               ["logits"].sum()))
