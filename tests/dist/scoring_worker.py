"""One launched job: scoring, selection and deactivation on every engine in turn.

Run under torchrun by tests/ncft/scoring/test_dist.py. Per backend, on a tiny Llama:
gradient attribution (both position modes), top-k selection with the cross-rank
checksum check, NeFT cosine against perturbed checkpoints (with a spy counting
`engine.gathered` calls), NeFT cosine after 2 full fine-tuning steps, and
deactivation by activation vs by weight with gathered full weights before/after, and
NeFT §6.1's max Pearson scores (forward hooks, no gathers).
Rank 0 saves tensors and a JSON report; pytest compares them across engines.

DeepSpeed runs with `stage3_param_persistence_threshold: 0`, so every parameter is
really partitioned and gathered by ZeRO-3's hooks during forward and the partial
backward (the default config keeps all of this tiny model's parameters whole). On
ZeRO-3, weight deactivation must fall back to `Engine.edited` (its segments are the
fp32 master partitions, a separate copy from what the forward gathers on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.engines import OptimConfig, build_engine
from ncft.arch import get_adapter
from ncft.data.examples import Example, encode
from ncft.studies.deactivate import deactivate_activations, deactivate_weights
from ncft.neuron_set import NeuronSet
from ncft.scoring.attribution import GradAttribution
from ncft.scoring.cosine import CheckpointReference, WeightCosine, finetune_and_score
from ncft.studies.utilization import pearson_scores
from ncft.selection import check_identical_across_ranks, to_neuron_set, top_k
from ncft.scoring.groups import row_groups, unit_groups
from tests.support.spawn import backends_main
from tests.support.tiny import SAMPLE_TEXT, VOCAB, tiny_llama, word_tokenizer

WORDS = SAMPLE_TEXT.split()
UNITS = {0: torch.tensor([0, 5, 36]), 1: torch.tensor([2, 17, 18])}
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
ROW_MODULES = ["gate", "up", "down", "attention"]


def encoded_examples():
    tok = word_tokenizer(WORDS)
    exs = [Example(" ".join(WORDS[i : i + 4 + i % 5]), WORDS[i + 4 + i % 5])
           for i in range(0, 155, 5)]  # 31 examples: no world size divides them
    return encode(exs, tok, max_length=16, add_eos=False)


def spy_gathers(engine) -> list[int]:
    """Record how many parameters each `gathered` call asks for."""
    calls: list[int] = []
    original = engine.gathered

    def spy(fqns):
        calls.append(len(fqns))
        return original(fqns)

    engine.gathered = spy
    return calls


def gather_all(engine) -> dict[str, torch.Tensor]:
    out = {}
    for name, _ in engine.named_parameter_shapes():
        with engine.gathered([name]) as full:
            out[name] = full[name].detach().clone()
    return out


def logits(engine) -> torch.Tensor:
    with torch.no_grad():
        return engine.forward({"input_ids": IDS}).logits.detach().clone()


def attribution(engine, blocks, encoded, report, tensors) -> None:
    groups = unit_groups(blocks)
    for positions in ("answer", "all"):
        scorer = GradAttribution(encoded, blocks, positions=positions, batch_size=3)
        scores = scorer.score(engine, groups)
        for name, s in scores.items():
            tensors[f"attr_{positions}/{name}"] = s
    # ZeRO-3 allocates its (zero) gradient partitions on any backward; nothing may be
    # nonzero, or a training step after scoring would apply the scoring pass.
    grads = [seg.grad() for seg in engine.segments()]
    grads += [p.grad for p in engine.module.parameters()]
    report["no_param_grads"] = all(g is None or not bool(g.any()) for g in grads)
    nset = to_neuron_set(top_k(scores, groups, fraction=0.1), groups, scorer.meta())
    report["selection_checksum"] = check_identical_across_ranks(engine, nset)


def cosine_vs_checkpoints(engine, blocks, model_rows, ckpts, report) -> None:
    calls = spy_gathers(engine)
    groups = {"rows": model_rows, "units": unit_groups(blocks)}
    for kind, ckpt in ckpts.items():
        meta = json.loads((ckpt / "changed.json").read_text())
        scores = WeightCosine(CheckpointReference(ckpt)).score(engine, groups[kind])
        picked = top_k(scores, groups[kind], count=len(meta), per_layer=False)
        report[f"cosine_{kind}"] = sorted([n, int(i)] for n, idx in picked.items() for i in idx)
    report["cosine_gather_calls"] = len(calls)
    del engine.gathered  # the spy was an instance attribute over the method


def deactivation(engine, blocks, report, tensors) -> None:
    """Logits with units off by hook and by zeroed local weights; weights restored."""
    before, base = gather_all(engine), logits(engine)
    with deactivate_activations(engine, blocks, UNITS):
        tensors["logits_act"] = logits(engine)
    with deactivate_weights(engine, NeuronSet.from_units(blocks, UNITS)) as how:
        tensors["logits_weight"] = logits(engine)
    report["deactivation_paths"] = how
    after = gather_all(engine)
    report["weights_restored"] = all(torch.equal(before[n], after[n]) for n in before)
    report["logits_restored"] = torch.equal(base, logits(engine))
    tensors["logits_base"] = base


def neft_pearson(engine, blocks, model_rows, encoded, report, tensors) -> None:
    """NeFT §6.1 max Pearson scores from forward hooks: no parameter gathered."""
    calls = spy_gathers(engine)
    scores = pearson_scores(engine, model_rows + unit_groups(blocks), encoded, batch_size=3,
                            pad_id=0, max_elements=64 * 64)  # several passes
    for name, s in scores.items():
        tensors[f"pearson/{name}"] = s
    report["pearson_gather_calls"] = len(calls)
    del engine.gathered


def finetuned_cosine(engine, model_rows, info, tensors) -> None:
    gen = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (6, 12), generator=gen)
        per = 6 // info.world_size
        ids = ids[info.rank * per : (info.rank + 1) * per]
        steps.append([{"input_ids": ids, "labels": ids}])
    scores, _ = finetune_and_score(engine, model_rows, iter(steps), num_steps=2)
    for name, s in scores.items():
        tensors[f"ft_cosine/{name}"] = s


def run_backend(backend: str, info, out: Path) -> None:
    model = tiny_llama(seed=0)
    blocks = get_adapter(model).mlp_blocks(model)
    model_rows = row_groups(model, ROW_MODULES)
    ds_config = str(out / "ds_partitioned.json")
    cfg = OptimConfig(lr=1e-2, micro_batch_size=6 // info.world_size)
    engine = build_engine(backend, model, cfg, info, ds_config=ds_config)
    report: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    attribution(engine, blocks, encoded_examples(), report, tensors)
    ckpts = {"rows": out / "ckpt_rows", "units": out / "ckpt_units"}
    cosine_vs_checkpoints(engine, blocks, model_rows, ckpts, report)
    deactivation(engine, blocks, report, tensors)
    neft_pearson(engine, blocks, model_rows, encoded_examples(), report, tensors)
    finetuned_cosine(engine, model_rows, info, tensors)
    if info.is_main_process:
        tag = f"{backend}_ws{info.world_size}"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, out / f"{tag}.safetensors")
        (out / f"{tag}.json").write_text(json.dumps(report))
    engine.close()


if __name__ == "__main__":
    backends_main(run_backend)
