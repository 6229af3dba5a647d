"""NeFT weight cosine: the rows changed on purpose are exactly the ones selected.

Reference weights come from a checkpoint directory (sharded safetensors, read one
segment at a time) or from a snapshot of the engine's local shards taken before
fine-tuning. No parameter is ever gathered (a spy on `engine.gathered` counts 0).
"""

import copy

import torch

from launcher.dist import DistInfo
from launcher.engines.common import OptimConfig
from launcher.engines.single import SingleEngine
from ncft.arch import get_adapter
from ncft.scoring import cosine
from ncft.scoring.cosine import CheckpointReference, LocalSnapshot, WeightCosine, finetune_and_score
from ncft.scoring.groups import row_groups, unit_groups
from ncft.selection import top_k
from tests.support.tiny import VOCAB, tiny_llama

INFO = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
L0, L1 = "model.layers.0.mlp", "model.layers.1.mlp"
# (module, storage row) of the NeFT rows changed on purpose
CHANGED_ROWS = [(f"{L0}.up_proj", 3), (f"{L0}.up_proj", 10), (f"{L1}.gate_proj", 5),
                (f"{L1}.down_proj", 7)]
CHANGED_UNITS = [(L0, 12), (L1, 30)]  # unit 12: down column only; unit 30: gate row only



def _engine():
    engine = SingleEngine(tiny_llama(seed=0), OptimConfig(lr=1e-2), INFO)
    engine.gathers = 0
    original = engine.gathered

    def spy(fqns):
        engine.gathers += 1
        return original(fqns)

    engine.gathered = spy
    return engine


def _perturb(model, rows=(), units=()):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module, r in rows:
            w = model.get_parameter(f"{module}.weight")
            w[r] += 0.5 * torch.randn(w.shape[1], generator=gen)
        for mlp, j in units:
            target = f"{mlp}.down_proj.weight" if j == 12 else f"{mlp}.gate_proj.weight"
            w = model.get_parameter(target)
            if j == 12:
                w[:, j] += 0.5 * torch.randn(w.shape[0], generator=gen)
            else:
                w[j] += 0.5 * torch.randn(w.shape[1], generator=gen)


def _chosen(selected):
    return sorted((name, int(i)) for name, idx in selected.items() for i in idx)


def test_changed_units_exactly_selected(tmp_path):
    engine = _engine()
    tuned = copy.deepcopy(engine.module)
    _perturb(tuned, units=CHANGED_UNITS)
    tuned.save_pretrained(tmp_path, max_shard_size="40KB")  # several files + an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    blocks = get_adapter(engine.module).mlp_blocks(engine.module)
    units = unit_groups(blocks)
    scores = WeightCosine(CheckpointReference(tmp_path)).score(engine, units)
    got = top_k(scores, units, count=len(CHANGED_UNITS), per_layer=False)
    assert _chosen(got) == sorted(CHANGED_UNITS)
    reverse = top_k(scores, units, count=10, per_layer=False, reverse=True)
    assert not set(_chosen(reverse)) & set(CHANGED_UNITS)
    assert _chosen(reverse) == [(L0, i) for i in range(10)]  # all cos = 1: ties by index
    assert engine.gathers == 0


def test_changed_rows_exactly_selected(tmp_path, monkeypatch):
    # tiny chunks: rows are split across chunks and still summed correctly
    monkeypatch.setattr(cosine, "CHUNK_ELEMENTS", 100)
    engine = _engine()
    tuned = copy.deepcopy(engine.module)
    _perturb(tuned, CHANGED_ROWS)
    tuned.save_pretrained(tmp_path)
    rows = row_groups(engine.module, ["gate", "up", "down"])
    scores = WeightCosine(CheckpointReference(tmp_path)).score(engine, rows)
    got = top_k(scores, rows, count=len(CHANGED_ROWS), per_layer=False)
    assert _chosen(got) == sorted(CHANGED_ROWS)
    untouched = [float(scores[n][r]) for n in scores for r in range(scores[n].numel())
                 if (n, r) not in CHANGED_ROWS]
    assert max(abs(u) for u in untouched) < 1e-12


def test_snapshot_reference_and_finetune(tmp_path):
    engine = _engine()
    rows = row_groups(engine.module, ["up", "down", "attention"])
    snap = LocalSnapshot.take(engine)
    _perturb(engine.module, CHANGED_ROWS[:2] + CHANGED_ROWS[3:])
    scores = WeightCosine(snap).score(engine, rows)
    got = top_k(scores, rows, count=3, per_layer=False)
    assert _chosen(got) == sorted(CHANGED_ROWS[:2] + CHANGED_ROWS[3:])
    assert snap.nbytes == sum(p.numel() * 4 for p in engine.module.parameters())

    # NeFT's recipe: full fine-tuning steps, then cos against the snapshot
    fresh = _engine()
    before = {n: p.detach().clone() for n, p in fresh.module.named_parameters()}
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    steps = iter([[{"input_ids": ids, "labels": ids}]] * 3)
    scores, meta = finetune_and_score(fresh, rows, steps, num_steps=2)
    assert meta["finetune_steps"] == 2 and meta["scorer"] == "weight_cosine"
    name = "model.layers.1.self_attn.q_proj"
    w0 = before[f"{name}.weight"].double()
    w1 = fresh.module.get_parameter(f"{name}.weight").double()
    expected = 1 - torch.nn.functional.cosine_similarity(w0, w1, dim=1, eps=0)
    torch.testing.assert_close(scores[name], expected, rtol=1e-9, atol=1e-12)
    assert fresh.gathers == 0
