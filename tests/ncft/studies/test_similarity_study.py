import itertools

import pytest
import torch

from launcher.dist import DistInfo
from launcher.engines.common import OptimConfig
from launcher.engines.single import SingleEngine
from ncft.analysis.similarity import layer_similarity
from ncft.arch import get_adapter
from ncft.continual.task import TaskData
from ncft.data.examples import Example, collate, encode
from ncft.selection.pipeline import SelectConfig, SelectionPipeline
from ncft.studies.similarity import paper_similarity
from tests.support.tiny import SAMPLE_TEXT, tiny_llama, word_tokenizer

INFO = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
WORDS = SAMPLE_TEXT.split()
CFG = SelectConfig(scorer="grad_attribution", fraction=0.2, count=None, per_layer=True,
                   modules=("gate", "up", "down"), unit="neuron", positions="answer",
                   num_examples=6, batch_size=3, cosine_steps=1, union_with_previous=False,
                   seed=0, exclude_previous=False, model_id="", reversed_fraction=None,
                   fraction_of="candidates")


def test_paper_similarity_reads_each_tasks_own_model():
    tok = word_tokenizer(WORDS)
    examples = {t: [Example(" ".join(WORDS[i : i + 5]), WORDS[i + 5]) for i in range(o, 60, 6)]
                for t, o in (("a", 0), ("b", 3))}
    tasks = [TaskData(t, "classification", None, ex, ex, 32) for t, ex in examples.items()]
    enc = {t: encode(ex, tok, 32) for t, ex in examples.items()}
    engines = []

    def make_engine():
        model = tiny_llama(seed=0)
        engines.append(SingleEngine(model, OptimConfig(lr=1e-2), INFO))
        return engines[-1], model

    def steps_of(engine, i):
        e = enc["ab"[i]]
        return ([collate(e[k : k + 4], 0)] for k in itertools.cycle(range(0, len(e), 4)))

    pipe = SelectionPipeline(CFG, tok, lambda *a: iter(()))
    chosen = []

    def select(engine, model, j):
        chosen.append(pipe.select(engine, model, tasks[j], j))
        return chosen[-1]

    out = paper_similarity(make_engine, steps_of, select, ["a", "b"], enc, num_steps=3,
                           batch_size=4, pad_id=0, log=lambda *_: None)
    assert out["tasks"] == ["a", "b"] and out["layers"] == [0, 1]
    assert len(out["per_layer"]) == 2 and all(len(r) == 2 for r in out["per_layer"])
    assert all(len(c) == 2 for r in out["per_layer"] for c in r)  # two layers
    # a task with itself in its own model: the same set, cosine 1
    assert out["mean"][0][0] == pytest.approx(1.0) and out["mean"][1][1] == pytest.approx(1.0)
    assert len(out["performance"]) == 2 and len(out["performance"][1]) == 2
    # row i is read in M_i: recompute it from M_0's weights and the sets chosen on M_0
    m0 = engines[0].module
    blocks = get_adapter(m0).mlp_blocks(m0)
    params = dict(m0.named_parameters())
    ref = layer_similarity(blocks, {"a": chosen[0].units(blocks), "b": chosen[1].units(blocks)},
                           lambda f: params[f].detach())
    assert out["per_layer"][0] == ref["per_layer"][0]
    # M_0 and M_1 are different models (each tuned on its own task)
    assert not torch.equal(params["model.layers.0.mlp.up_proj.weight"],
                           dict(engines[1].module.named_parameters())[
                               "model.layers.0.mlp.up_proj.weight"])
