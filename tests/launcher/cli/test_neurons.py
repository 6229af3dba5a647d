"""`ncft neurons score|inspect|overlap` end to end on a tiny model, in this process."""

import argparse
import json

import pytest
import torch

from launcher.cli.neurons import add_neuron_commands
from launcher.dist import free_port
from ncft.neuron_set import NeuronSet
from tests.support.tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_dir(root / "model")
    rows = [{"text": f"the {a} {b} jumps over", "label": b}
            for a in ("quick", "slow", "red", "blue", "old") for b in ("fox", "hen", "cow")]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
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


def _score(workdir, out, *extra):
    return _run("score", "--model", workdir / "model", "--data", workdir / "task.jsonl",
                "--labels", "fox,hen,cow", "--out", out, "--num-examples", 12,
                "--batch-size", 4, "--max-length", 24, *extra)  # fmt: skip


def test_score_inspect_overlap(workdir, capsys):
    attr, rand, cos = (workdir / f"{n}.safetensors" for n in ("attr", "rand", "cos"))
    assert _score(workdir, attr, "--fraction", 0.1) == 0
    nset = NeuronSet.load(attr)
    assert nset.meta["scorer"] == "grad_attribution" and nset.meta["num_examples"] == 12
    assert {k: len(v) for k, v in nset.units(_blocks(workdir)).items()} == {0: 4, 1: 4}
    assert _score(workdir, rand, "--scorer", "random", "--count", 3, "--union-with", attr) == 0
    union = NeuronSet.load(rand)
    assert union.meta["union_with"] == nset.checksum() and union.iou(nset) > 0
    assert _score(workdir, cos, "--scorer", "weight_cosine", "--unit", "row",
                  "--modules", "up,attention", "--cosine-steps", 2, "--count", 5,
                  "--global-topk", "--lr", 1e-2) == 0  # fmt: skip
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


def _blocks(workdir):
    from transformers import AutoModelForCausalLM

    from ncft.arch import get_adapter

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    return get_adapter(model).mlp_blocks(model)


def test_score_refuses_bad_arguments(workdir):
    with pytest.raises(SystemExit, match="exactly one of --task or --data"):
        _run("score", "--model", workdir / "model", "--out", workdir / "x.safetensors")
    with pytest.raises(SystemExit, match="--scorer must be one of"):
        _score(workdir, workdir / "x.safetensors", "--scorer", "magic")
