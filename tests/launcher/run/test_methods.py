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
from tests.support.spawn import REPO, run_worker, worker_env

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("methods")
    run_worker("methods_worker.py", out, ",".join(RUNS), {"NCFT_CACHE": str(cache)})
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
    if name == "seqft":  # eval.calibration: content_free, after every stage
        assert results["protocol"]["calibration"] == "content_free"
        for task, labels in (("sst2", 2), ("rte", 2)):
            for detail in results["details"][task]:
                prior = torch.tensor(detail["label_prior"], dtype=torch.float64)
                assert len(prior) == labels and float(prior.exp().sum()) == pytest.approx(1)
    if name == "wncft":
        weights = results["details"]["sst2"][1]["mixing_weights"]
        assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)
        assert (run / "wncft").is_dir() and list((run / "tensorboard").iterdir())
        sim = results["similarity_final_model"]  # our variant: the final model's neurons
        assert sim["tasks"] == ["sst2", "rte"] and len(sim["generalization"]) == 2
        assert sim["mean"][0][0] == pytest.approx(1.0)
        paper = results["similarity"]  # Leng & Xiong's protocol: one M_i per task
        assert paper["protocol"] == "paper" and paper["steps"] == 2
        assert len(paper["performance"]) == 2 and all(len(r) == 2 for r in paper["mean"])
        assert paper["mean"][0][0] == pytest.approx(1.0)
        deact = results["deactivation"]
        assert deact["mode"] == "weights"
        ft = deact["finetune_matrix"]
        assert len(ft["task_neurons_trained"]) == 2 and len(ft["random_trained"][1]) == 2
        assert ft["lr"] == [0.003]  # study.finetune_lr, not training.lr
        for fig in ("finetune_matrix", "similarity_paper_layers", "neft_utilization_rte"):
            assert (run / "plots" / f"{fig}.png").is_file(), fig


def test_neft_rows_select_attention_and_mlp_rows(runs):
    nset = NeuronSet.load(runs / "neft_rows" / "neurons" / "sst2.safetensors")
    assert nset.meta["scorer"] == "weight_cosine" and nset.meta["unit"] == "row"
    names = " ".join(nset.entries)
    assert "q_proj" in names and "gate_proj" in names
    assert all(sel.axis == 0 for name, sel in nset.entries.items()
               if "down_proj" not in name)


def test_neft_run_records_rank_shift(runs):
    run = runs / "neft_rows"
    shift = json.loads((run / "results.json").read_text())["weight_movement_rank_shift"]["sst2"]
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
    assert (run / "plots" / "weight_movement_rank_shift_sst2.png").is_file()
    assert (run / "plots" / "neft_utilization_sst2.png").is_file()


@pytest.mark.parametrize("name", ["neft_rows", "wncft"])
def test_runs_record_neft_utilization(runs, name):
    # NeFT §6.1 on every task with a neuron set: Pearson scores before and after it
    run = runs / name
    neft = json.loads((run / "results.json").read_text())["neft"]
    tasks = ["sst2"] if name in SINGLE_TASK else ["sst2", "rte"]
    assert sorted(neft) == sorted(tasks)  # results.json keys are sorted
    for task in tasks:
        u = neft[task]
        nset = NeuronSet.load(run / "neurons" / f"{task}.safetensors")
        before = load_file(run / "neft" / f"{task}.pearson_before.safetensors")
        after = load_file(run / "neft" / f"{task}.pearson_after.safetensors")
        assert u["num_neurons"] == sum(v.numel() for v in before.values())
        # rows: one weight entry per trained row; units: count each down_proj column
        key = ".weight" if name == "neft_rows" else "down_proj.weight"
        trained = sum(s.indices.numel() for f, s in nset.entries.items() if f.endswith(key))
        assert u["counts"]["trained"] == trained > 0
        assert all(v.min() >= -1 and v.max() <= 1 for v in before.values())
        assert any(not torch.equal(before[g], after[g]) for g in before), "training moved them"
        assert sum(u["buckets"]["count"]) == u["num_neurons"]


def test_random_rows_control_records_rank_shift(runs):
    run = runs / "random_rows"
    nset = NeuronSet.load(run / "neurons" / "sst2.safetensors")
    assert nset.meta["scorer"] == "random" and nset.meta["unit"] == "row"
    key = "weight_movement_rank_shift"
    shift = json.loads((run / "results.json").read_text())[key]["sst2"]
    neft_rows = json.loads((runs / "neft_rows" / "results.json").read_text())[key]["sst2"]
    assert shift["num_rows"] == neft_rows["num_rows"]
    # Same probe on the same starting model: identical "before" scores.
    a, b = (load_file(r / "neft" / "sst2.before.safetensors")
            for r in (run, runs / "neft_rows"))
    assert all(torch.equal(a[g], b[g]) for g in b)


def test_neurons_score_selects_what_the_run_selected(runs, cache, tmp_path):
    # One pipeline: on the base model, `ncft neurons score` with the run's spec picks
    # the run's first-stage set, here NeFT's probe rows (same probe data order).
    out = tmp_path / "sst2.safetensors"
    cmd = [sys.executable, "-m", "launcher.cli.main", "neurons", "score", SPEC,
           *overrides("neft_rows", tmp_path), "--task", "sst2", "--out", str(out)]
    proc = subprocess.run(cmd, env=worker_env({"NCFT_CACHE": str(cache)}), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
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


def test_olora_keeps_earlier_adapters_and_exports_their_sum(runs, cache):
    from transformers import AutoModelForCausalLM

    from ncft import olora
    from ncft.continual.config import LoraOptions

    run = runs / "olora"
    first = load_file(run / "checkpoints" / "01-sst2" / "model.safetensors")
    second = load_file(run / "checkpoints" / "02-rte" / "model.safetensors")
    assert any(".task0." in k for k in first) and not any(".task1." in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first), "task 0 must stay frozen"
    assert any(".lora_B.task1." in k and v.abs().sum() > 0 for k, v in second.items())
    # The exported model is a plain HF model computing what both adapters compute.
    base = AutoModelForCausalLM.from_pretrained(cache / "tiny-random-llama")
    opts = LoraOptions(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))
    adapted = olora.with_adapters(base, 2, opts, seed=0)
    missing, unexpected = adapted.load_state_dict(second, strict=False)
    assert not unexpected and not [m for m in missing if "lora_" in m]
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    ids = torch.tensor([[1, 50, 90, 140, 30, 70]])
    with torch.no_grad():
        want = adapted.eval()(input_ids=ids).logits
        got = final.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wncft_example_query_and_generate_protocol_recorded(runs):
    results = json.loads((runs / "wncft_example" / "results.json").read_text())
    assert results["protocol"] == {"classification": "generate", "calibration": "none",
                                   "wncft_query": "example"}
    detail = results["details"]["sst2"][1]
    assert detail["query"] == "example" and sum(detail["top_task_share"]) == pytest.approx(1)
    assert sum(detail["mixing_weights"]) == pytest.approx(1.0)
    assert results["summary"]["forgetting"] is None  # no per-task reference: no FG
    assert "not FG" in results["summary"]["retention"]["note"]


@pytest.mark.parametrize("name", ["seqft", "seqlora"])
def test_forgetting_diagnosis_reads_runs_through_the_product_loader(runs, cache, tmp_path,
                                                                   monkeypatch, name):
    """benchmarks/forgetting_diagnosis.py on a finished run: plain and LoRA checkpoints."""
    from benchmarks.forgetting_diagnosis import main as diagnose

    monkeypatch.setenv("NCFT_CACHE", str(cache))
    out = tmp_path / "diagnosis.json"
    diagnose([str(runs / name), "--out", str(out), "--calibrate", "--examples", "4"])
    report = json.loads(out.read_text())
    assert report["method"] == name and report["task"] == "sst2"
    assert set(report["units"]) == {"random units"}  # no NeuronSets: random units only
    stages = [row for row in report["margins"] if row is not None]
    assert len(stages) == 2 and all("content_free_s" in row for row in stages)
    end = report["units"]["random units"]["stage1_to_end"]
    assert end["relative_change"] > 0, "the second stage changed the first task's units"
