import itertools

import torch

from launcher.dist import DistInfo
from launcher.engines.common import OptimConfig
from launcher.engines.single import SingleEngine
from ncft.arch import get_adapter
from ncft.data.examples import Example, collate, encode
from ncft.masks.install import freeze_unselected, install
from ncft.neuron_set import NeuronSet
from ncft.studies.finetune_matrix import finetune_matrix
from tests.support.tiny import SAMPLE_TEXT, tiny_llama, word_tokenizer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
WORDS = SAMPLE_TEXT.split()


def _task(offset, tok):
    ex = [Example(" ".join(WORDS[i : i + 5]), WORDS[i + 5]) for i in range(offset, 60, 6)]
    return encode(ex, tok, 32)


def _study(trained, task_metric=None):
    tok = word_tokenizer(WORDS)
    data = {"a": _task(0, tok), "b": _task(3, tok)}
    blocks = get_adapter(tiny_llama(seed=0)).mlp_blocks(tiny_llama(seed=0))
    sets = {"a": NeuronSet.from_units(blocks, {0: torch.tensor([1, 4, 7]), 1: torch.arange(5)}),
            "b": NeuronSet.from_units(blocks, {1: torch.tensor([2, 30])})}

    def make_engine(nset):
        model = tiny_llama(seed=0)
        if nset is None:
            return SingleEngine(model, OptimConfig(lr=1e-2), INFO), None
        freeze_unselected(model, nset.entries)
        engine = SingleEngine(model, OptimConfig(lr=1e-2), INFO)
        trained.append(engine)
        return engine, install(engine, nset.entries)

    def steps_of(engine, i):
        enc = data["ab"[i]]
        return ([collate(enc[k : k + 4], 0)] for k in itertools.cycle(range(0, len(enc), 4)))

    return finetune_matrix(make_engine, steps_of, blocks, sets, data, num_steps=3, seed=0,
                           batch_size=4, pad_id=0, log=lambda *_: None,
                           task_metric=task_metric), sets


def test_finetune_matrix_shape_diagonal_determinism():
    engines = []
    out, sets = _study(engines)
    assert out["tasks"] == ["a", "b"] and out["steps"] == 3
    for key in ("task_neurons_trained", "random_trained"):
        assert len(out[key]) == 2 and all(len(r) == 2 for r in out[key])
        assert len(out["loss"][key]) == 2
    # training task i's units on task i lowers its own loss (the diagonal is computed)
    for i in range(2):
        assert out["loss"]["task_neurons_trained"][i][i] < out["loss"]["baseline"][i]
    assert out["loss"]["random_trained"] != out["loss"]["task_neurons_trained"]
    again, _ = _study([])
    assert again == out  # deterministic
    # only the set's elements moved: compare task a's trained engine with the base model
    base = dict(tiny_llama(seed=0).named_parameters())
    moved = dict(engines[0].module.named_parameters())
    mask = sets["a"]
    for name, p in moved.items():
        changed = (p.detach() != base[name].detach())
        sel = mask.entries.get(name)
        allowed = torch.zeros_like(changed)
        if sel is not None:
            allowed.index_fill_(sel.axis, sel.indices, True)
        assert not (changed & ~allowed).any(), name
    assert any((p.detach() != base[n].detach()).any() for n, p in moved.items())



def test_task_metric_scores_the_zero_shot_and_every_trained_model():
    # Each call returns a distinct, engine-derived number, so the cells show which
    # model each came from: the sum of a down column that set b trains.
    seen = []

    def measure(engine):
        value = float(engine.module.model.layers[1].mlp.down_proj.weight[:, 30].sum())
        seen.append(engine)
        return [value, -value]

    out, _ = _study([], task_metric=measure)
    own = out["task_metric"]
    assert own["tasks"] == ["a", "b"] and len(seen) == 1 + 2 * 2
    assert own["baseline"] == measure(SingleEngine(tiny_llama(seed=0), OptimConfig(), INFO))
    # row b trains layer 1's unit 30 (down column 30), row a (units 0-4) does not
    assert own["task_neurons_trained"][1] != own["baseline"]
    assert own["task_neurons_trained"][0] == own["baseline"]
    assert len(own["random_trained"]) == 2
    assert out["baseline"] != own["baseline"]  # beside teacher-forced accuracy
