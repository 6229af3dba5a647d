"""`ncft neurons score|inspect|overlap` end to end on a tiny model, in this process."""

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.cli.neurons import add_neuron_commands
from launcher.dist import free_port
from launcher.spec import SpecError
from ncft.neuron_set import NeuronSet
from tests.support.tiny import save_tiny_model_dir

SPEC = """
model: {{name_or_path: {model}}}
tasks:
  - name: animals
    source: {{type: json, train: task.jsonl, test: task.jsonl}}
    labels: [fox, hen, cow]
    max_length: 24
method: neurons
selection: {{num_examples: 12, batch_size: 4}}
training: {{micro_batch_size: 4}}
output: {{dir: runs/unused}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_dir(root / "model")
    rows = [{"text": f"the {a} {b} jumps over", "label": b}
            for a in ("quick", "slow", "red", "blue", "old") for b in ("fox", "hen", "cow")]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "spec.yaml").write_text(SPEC.format(model=root / "model"))
    return root


@pytest.fixture(autouse=True)
def world_of_one(monkeypatch):
    # As torchrun would set it: the CLI runs in this process and leaves env unchanged.
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo").items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(*argv) -> int:
    parser = argparse.ArgumentParser()
    add_neuron_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["neurons", *map(str, argv)])
    return ns.func(ns)


def _score(workdir, out, *overrides, task="animals", previous=None, finetuned=None):
    extra = [] if previous is None else ["--previous", previous]
    extra += [] if finetuned is None else ["--finetuned", finetuned]
    return _run("score", workdir / "spec.yaml", *overrides, "--task", task, "--out", out,
                *extra)


def test_score_inspect_overlap(workdir, capsys):
    attr, rand, cos = (workdir / f"{n}.safetensors" for n in ("attr", "rand", "cos"))
    assert _score(workdir, attr, "selection.fraction=0.1") == 0
    nset = NeuronSet.load(attr)
    assert nset.meta["scorer"] == "grad_attribution" and nset.meta["num_examples"] == 12
    assert nset.meta["command"]["overrides"] == ["selection.fraction=0.1"]
    assert {k: len(v) for k, v in nset.units(_blocks(workdir)).items()} == {0: 4, 1: 4}
    assert _score(workdir, rand, "selection.scorer=random", "selection.count=3",
                  "selection.union_with_previous=true", previous=attr) == 0
    union = NeuronSet.load(rand)
    assert union.meta["union_with"] == nset.checksum() and union.iou(nset) > 0
    assert _score(workdir, cos, "selection.scorer=weight_cosine", "selection.unit=row",
                  "selection.modules=[up,attention]", "selection.cosine_steps=2",
                  "selection.count=5", "selection.per_layer=false", "training.lr=1e-2") == 0
    rows = NeuronSet.load(cos)
    assert rows.meta["finetune_steps"] == 2
    assert sum(len(s) for f, s in rows.entries.items() if f.endswith("weight")) == 5
    capsys.readouterr()

    assert _run("inspect", attr) == 0
    text = capsys.readouterr().out
    assert "mlp.down_proj.weight[col]" in text and "mlp.gate_proj.bias[row]" in text
    assert "\n0      4" in text and '"scorer": "grad_attribution"' in text
    assert _run("overlap", attr, rand, cos) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["attr", "rand", "cos"]
    assert lines[1].split()[1] == "1.000" and lines[2].split()[2] == "1.000"


def test_score_against_finetuned_checkpoint_selects_the_moved_rows(workdir, tmp_path):
    moved = {"model.layers.0.mlp.up_proj.weight": [3, 30], "model.layers.1.mlp.up_proj.weight": [7]}
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    state = load_file(workdir / "model" / "model.safetensors")
    for fqn, rows in moved.items():
        state[fqn][rows] += 1.0
    save_file(state, tuned / "model.safetensors")
    out = tmp_path / "ref.safetensors"
    assert _score(workdir, out, "selection.scorer=weight_cosine", "selection.unit=row",
                  "selection.modules=[up]", "selection.count=3", "selection.per_layer=false",
                  finetuned=tuned) == 0
    nset = NeuronSet.load(out)
    assert nset.meta["reference"] == str(tuned) and "finetune_steps" not in nset.meta
    weights = {f: s.indices.tolist() for f, s in nset.entries.items() if f.endswith("weight")}
    assert weights == moved  # (each row also carries its bias element)


def _blocks(workdir):
    from transformers import AutoModelForCausalLM

    from ncft.arch import get_adapter

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    return get_adapter(model).mlp_blocks(model)


def test_score_refuses_bad_arguments(workdir):
    out = workdir / "x.safetensors"
    with pytest.raises(ValueError, match="--task 'nope' is not a task of the spec"):
        _score(workdir, out, task="nope")
    with pytest.raises(ValueError, match="--out must end in .safetensors"):
        _score(workdir, workdir / "x.pt")
    with pytest.raises(ValueError, match="--previous FILE exactly when"):
        _score(workdir, out, "selection.union_with_previous=true")
    with pytest.raises(ValueError, match="--finetuned needs selection.scorer weight_cosine"):
        _score(workdir, out, finetuned=workdir / "model")
    with pytest.raises(SpecError, match="selection.scorer: Input should be"):
        _score(workdir, out, "selection.scorer=magic")
    assert not out.exists()
