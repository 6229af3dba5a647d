"""Every `method` (and NeFT's row selection) runs end to end and writes its run dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ncft.neuron_set import NeuronSet
from tests.dist.methods_worker import RUNS, SINGLE_TASK, SPEC, overrides
from tests.support.spawn import REPO, worker_env

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("methods")
    env = worker_env({"NCFT_CACHE": str(cache)})
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "dist" / "methods_worker.py"), str(out),
         ",".join(RUNS)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_method_run_directory(runs, name):
    run = runs / name
    results = json.loads((run / "results.json").read_text())
    n = 1 if name in SINGLE_TASK else 2
    assert len(results["matrix"]) == n and all(len(r) == n for r in results["matrix"])
    assert (run / "final" / "config.json").is_file()
    final = load_file(run / "final" / "model.safetensors")
    assert "lora" not in " ".join(final), "LoRA must be merged into the exported model"
    if name == "per_task":  # each column its own model: only the diagonal counts
        assert results["summary"]["backward_transfer"] is None
    if name == "wncft":
        weights = results["details"]["sst2"][1]["mixing_weights"]
        assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)
        assert (run / "wncft").is_dir() and list((run / "tensorboard").iterdir())
        sim = results["similarity"]  # Fig. 3 inputs, from the final model's task neurons
        assert sim["tasks"] == ["sst2", "rte"] and len(sim["generalization"]) == 2
        assert sim["mean"][0][0] == pytest.approx(1.0)


def test_neft_rows_select_attention_and_mlp_rows(runs):
    nset = NeuronSet.load(runs / "neft_rows" / "neurons" / "sst2.safetensors")
    assert nset.meta["scorer"] == "weight_cosine" and nset.meta["unit"] == "row"
    names = " ".join(nset.entries)
    assert "q_proj" in names and "gate_proj" in names
    assert all(sel.axis == 0 for name, sel in nset.entries.items()
               if "down_proj" not in name)


def test_neft_run_records_rank_shift(runs):
    run = runs / "neft_rows"
    shift = json.loads((run / "results.json").read_text())["neft"]["sst2"]
    counts = shift["counts"]
    assert sum(v["selected"] + v["unselected"] for v in counts.values()) == shift["num_rows"]
    assert 0 < shift["num_selected"] < shift["num_rows"]
    before = load_file(run / "neft" / "sst2.before.safetensors")
    after = load_file(run / "neft" / "sst2.after.safetensors")
    assert list(shift["groups"]) == [g for g in shift["groups"] if g in before]
    assert set(before) == set(after) == set(shift["groups"])
    assert any(not torch.equal(before[g], after[g]) for g in before), "a real second probe"
    # The saved "before" scores are the ones the rows were chosen from: selected rows
    # (top 5% per layer) score higher on average than the rest.
    nset = NeuronSet.load(run / "neurons" / "sst2.safetensors")
    chosen, rest = [], []
    for group, scores in before.items():
        entry = nset.entries.get(f"{group}.weight")
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        if entry is not None:
            mask[entry.indices] = True
        chosen.append(scores[mask])
        rest.append(scores[~mask])
    assert torch.cat(chosen).mean() > torch.cat(rest).mean()
    assert (run / "plots" / "neft_rank_shift_sst2.png").is_file()


def test_random_rows_control_records_rank_shift(runs):
    run = runs / "random_rows"
    nset = NeuronSet.load(run / "neurons" / "sst2.safetensors")
    assert nset.meta["scorer"] == "random" and nset.meta["unit"] == "row"
    shift = json.loads((run / "results.json").read_text())["neft"]["sst2"]
    neft_rows = json.loads((runs / "neft_rows" / "results.json").read_text())["neft"]["sst2"]
    assert shift["num_rows"] == neft_rows["num_rows"]
    # Same probe on the same starting model: identical "before" scores.
    a, b = (load_file(r / "neft" / "sst2.before.safetensors")
            for r in (run, runs / "neft_rows"))  # fmt: skip
    assert all(torch.equal(a[g], b[g]) for g in b)


def test_neurons_score_selects_what_the_run_selected(runs, cache, tmp_path):
    # One pipeline: on the base model, `ncft neurons score` with the run's spec picks
    # the run's first-stage set, here NeFT's probe rows (same probe data order).
    out = tmp_path / "sst2.safetensors"
    cmd = [sys.executable, "-m", "launcher.cli.main", "neurons", "score", SPEC,
           *overrides("neft_rows", tmp_path), "--task", "sst2", "--out", str(out)]
    proc = subprocess.run(cmd, env=worker_env({"NCFT_CACHE": str(cache)}), cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = NeuronSet.load(runs / "neft_rows" / "neurons" / "sst2.safetensors")
    scored = NeuronSet.load(out)
    assert scored.checksum() == ran.checksum()
    assert {k: scored.meta.get(k) for k in ran.meta} == ran.meta  # the CLI adds its command


def test_random_neurons_differ_from_attribution(runs):
    a = NeuronSet.load(runs / "neurons" / "neurons" / "sst2.safetensors")
    r = NeuronSet.load(runs / "random_neurons" / "neurons" / "sst2.safetensors")
    assert r.meta["scorer"] == "random" and a.meta["scorer"] == "grad_attribution"
    assert a.num_selected() == r.num_selected() and a.iou(r) < 1.0


def test_full_changes_attention_neurons_leave_it(runs, cache):
    base = load_file(cache / "tiny-random-llama" / "model.safetensors")
    full = load_file(runs / "full" / "final" / "model.safetensors")
    neurons = load_file(runs / "neurons" / "final" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(full[name], base[name])
    assert torch.equal(neurons[name], base[name])
