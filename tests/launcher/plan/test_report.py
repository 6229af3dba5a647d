"""`ncft plan` on the shipped 7B spec and the three shipped configs: text and JSON."""

from __future__ import annotations

import json

import pytest

from launcher.cli.main import main
from launcher.plan.memory import TERMS
from launcher.spec.schema import REPO_ROOT
from tests.launcher.plan.test_model import PUBLIC_COUNTS

SPEC = str(REPO_ROOT / "examples" / "standard_cl_o1.yaml")
GIB = 1 << 30


def _plan_json(capsys, *args) -> dict:
    # overrides (positional) must come before the flags
    assert main(["plan", SPEC, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_standard_cl_o1_json_golden(capsys):
    plan = _plan_json(capsys)
    pr = plan["per_rank"]
    assert set(pr) == {*TERMS, "total"} and pr["total"] == sum(pr[t] for t in TERMS)
    assert (plan["engine"], plan["world_size"], plan["nodes"]) == ("deepspeed", 8, 1)
    assert plan["model"]["parameters"] == PUBLIC_COUNTS["llama-2-7b-hf"]
    # Llama-2-7b divides by 8 everywhere: bf16 partitions of every parameter, fp32
    # masters of gate/up/down (32 x 3 x 11008 x 4096), the 65 norms held whole.
    mlp = 32 * 3 * 11008 * 4096
    total = PUBLIC_COUNTS["llama-2-7b-hf"]
    assert pr["parameters"] == 2 * total // 8 + 4 * mlp // 8 + 2 * 65 * 4096
    assert pr["gradients"] == 2 * mlp // 8
    assert pr["optimizer"] == 8 * mlp // 8 + 4
    # 5% of units. Partitions hold whole rows (1376 of gate/up, 512 of down): int16
    # positions of the selected gate/up rows among the rank's 1376 (expected
    # 5% of them), down's selected columns once, and the NeuronSet's int64 indices.
    units = round(0.05 * 11008)
    assert pr["masks"] == 32 * (2 * 2 * units * 1376 / 11008 + 2 * units) + 4 * units * 32
    assert plan["selected_fraction"] == pytest.approx(units / 11008)
    assert plan["fits"] and plan["activations"]["checkpointing"] < pr["activations"]
    assert {(c["engine"], c["method"]) for c in plan["compare"]} == {
        (e, m) for e in ("deepspeed", "fsdp2", "fsdp1") for m in ("ncft", "full", "lora")
    }


def test_standard_cl_o1_text(capsys):
    assert main(["plan", SPEC]) == 0
    text = capsys.readouterr().out
    assert "meta-llama/Llama-2-7b-hf [llama-2-7b-hf (shipped config)]" in text
    assert "deepspeed, 8 ranks (1 node x 8), bf16 compute, fp32 master" in text
    for term in ("parameters", "gradients", "optimizer", "masks", "activations", "total"):
        assert f"\n  {term}" in text
    assert "fits in 80 GiB per GPU" in text


def test_world_size_nodes_gpu_memory_and_checkpointing(capsys):
    base = _plan_json(capsys)
    big = _plan_json(capsys, "--nodes", "4")  # 4 x nproc_per_node 8
    assert big["world_size"] == 32 and big["nodes"] == 4
    assert big["per_rank"]["parameters"] < base["per_rank"]["parameters"] / 3
    small = _plan_json(capsys, "--gpu-memory", "10")
    assert not small["fits"] and small["headroom"] < 0
    ckpt = _plan_json(capsys, "training.activation_checkpointing=true")
    assert ckpt["per_rank"]["activations"] == base["activations"]["checkpointing"]
    assert main(["plan", SPEC, "--world-size", "9", "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ncft: error: --world-size 9 must be a positive multiple")
    assert err.count("\n") == 1


@pytest.mark.parametrize("name", sorted(PUBLIC_COUNTS))
@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2", "fsdp1"])
def test_shipped_configs_plan_on_every_engine(capsys, name, backend):
    # Bloom's plain MLP has fc_in/fc_out, not gate/up/down.
    modules = "[fc_in,fc_out]" if name == "bloom-7b1" else "[gate,up,down]"
    plan = _plan_json(capsys, f"model.name_or_path={name}", f"engine.backend={backend}",
                      f"selection.modules={modules}")
    assert plan["model"]["parameters"] == PUBLIC_COUNTS[name]
    pr = plan["per_rank"]
    assert all(pr[t] > 0 for t in TERMS)
    # Every engine holds at least its share of the bf16 weights and fp32 moments
    # of the trainable share; none holds a full copy.
    assert PUBLIC_COUNTS[name] * 2 / 8 <= pr["parameters"] < PUBLIC_COUNTS[name] * 2
    assert pr["optimizer"] < PUBLIC_COUNTS[name] * 8 / 8


def test_methods_full_lora_and_union(capsys):
    full = _plan_json(capsys, "method=seqft")
    assert full["per_rank"]["masks"] == 0 and full["selected_fraction"] is None
    assert full["per_rank"]["optimizer"] == 8 * PUBLIC_COUNTS["llama-2-7b-hf"] // 8 + 4
    lora = _plan_json(capsys, "method=seqlora")
    adapters = 32 * 2 * (8 * 4096 + 4096 * 8)  # q_proj, v_proj: A [8, 4096], B [4096, 8]
    assert lora["per_rank"]["optimizer"] == 8 * adapters // 8 + 4
    union = _plan_json(capsys, "selection.union_with_previous=true")
    assert union["selected_fraction"] == pytest.approx(4 * round(0.05 * 11008) / 11008)


def test_olora_plans_one_trainable_adapter_beside_frozen_ones():
    from types import SimpleNamespace

    from launcher.plan.model import ParamInfo
    from launcher.plan.stage import lora_params

    q = ParamInfo("m.q_proj.weight", (6, 4), module="m.q_proj")
    info = SimpleNamespace(params=[q])
    params = lora_params(info, 2, ["q_proj"], frozen_adapters=2)
    trainable = [p.fqn for p in params if p.trainable]
    assert trainable == ["m.q_proj.lora_A.task2.weight", "m.q_proj.lora_B.task2.weight"]
    assert len(params) == 1 + 3 * 2
    assert [p.fqn for p in lora_params(info, 2, ["q_proj"]) if p.trainable] == [
        "m.q_proj.lora_A.default.weight", "m.q_proj.lora_B.default.weight"]


def test_sparse_delta_plans_state_for_selected_elements_only(capsys):
    masked = _plan_json(capsys)["per_rank"]
    plan = _plan_json(capsys, "training.update=sparse_delta")
    pr = plan["per_rank"]
    total = PUBLIC_COUNTS["llama-2-7b-hf"]
    units = round(0.05 * 11008)
    delta = 32 * 3 * units * 4096  # gate/up rows and down columns of 5% of units
    # Every matrix frozen (bf16 partitions), plus the deltas with their fp32 masters.
    assert pr["parameters"] == 2 * (total + delta) // 8 + 4 * delta // 8 + 2 * 65 * 4096
    assert pr["gradients"] == 2 * delta // 8
    assert pr["optimizer"] == 8 * delta // 8 + 4
    assert pr["masks"] == 0
    assert pr["gradients"] + pr["optimizer"] < 0.06 * (masked["gradients"] + masked["optimizer"])
    assert "sparse_delta: 216,268,800 delta elements train" in plan["stage"]


@pytest.mark.parametrize("world", [8, 1024])
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2", "fsdp1"])
def test_mask_term_is_at_most_one_percent_of_parameters(capsys, engine, world):
    # Issue #21: the NeuronSet holds one int32 list per layer, so its bytes stay small
    # next to a rank's share of the weights even at 1024 ranks.
    plan = _plan_json(capsys, f"engine.backend={engine}", "--world-size", str(world))
    pr = plan["per_rank"]
    assert 0 < pr["masks"] <= 0.01 * pr["parameters"], (pr["masks"], pr["parameters"])
