import pytest
import torch

from launcher.dist import DistInfo
from launcher.engines.common import OptimConfig
from launcher.engines.single import SingleEngine
from ncft.arch import get_adapter
from ncft.data.examples import Example, encode
from ncft.evaluate import evaluate_task
from ncft.neuron_set import NeuronSet
from ncft.studies.deactivate import deactivate_activations
from ncft.studies.deactivation import deactivation_grid
from tests.support.fake_engine import FakeEngine
from tests.support.tiny import SAMPLE_TEXT, tiny_llama, word_tokenizer


def _tiny(seed: int, mlp_bias: bool):
    """A tiny Llama in eval mode, a word tokenizer over SAMPLE_TEXT, and its MLP blocks."""
    model = tiny_llama(seed=seed, mlp_bias=mlp_bias).eval()
    tok = word_tokenizer(SAMPLE_TEXT.split())
    return model, tok, get_adapter(model).mlp_blocks(model)


def _next_word_set(tok, context: int, starts: range):
    """SAMPLE_TEXT's `context` words from each start, each followed by its next word as
    the target, encoded at length 32."""
    words = SAMPLE_TEXT.split()
    examples = [Example(" ".join(words[i : i + context]), words[i + context]) for i in starts]
    return encode(examples, tok, 32)


def test_grid_shapes_and_all_units_off_vs_none():
    model, tok, blocks = _tiny(seed=0, mlp_bias=False)
    eval_a = _next_word_set(tok, context=6, starts=range(0, 60, 7))
    eval_b = _next_word_set(tok, context=5, starts=range(3, 60, 6))
    every = {b.layer: torch.arange(b.d_ff) for b in blocks}
    none_like = {b.layer: torch.tensor([0]) for b in blocks}
    sets = {"a": NeuronSet.from_units(blocks, every), "b": NeuronSet.from_units(blocks, none_like)}
    engine = FakeEngine(model)
    grid = deactivation_grid(engine, blocks, sets, {"a": eval_a, "b": eval_b}, seed=0,
                             batch_size=4, pad_id=0, log=lambda *_: None)
    assert grid["tasks"] == ["a", "b"]
    assert len(grid["task_neurons_off"]) == 2 and all(len(r) == 2 for r in grid["random_off"])
    assert grid["num_units"] == {"a": 74, "b": 2}
    # every unit off = the MLPs contribute nothing: the loss must change
    assert grid["loss"]["task_neurons_off"][0] != grid["loss"]["baseline"]
    # "random" with every unit is the same set: identical to the task row
    assert grid["loss"]["random_off"][0] == grid["loss"]["task_neurons_off"][0]


def test_activation_and_weights_modes_give_the_same_grid():
    # study.deactivation_mode: zeroing the units' activations = zeroing their gate/up
    # rows (and biases) and down columns, so every number of the grid is equal
    model, tok, blocks = _tiny(seed=1, mlp_bias=True)
    ev = _next_word_set(tok, context=6, starts=range(0, 40, 7))
    sets = {"a": NeuronSet.from_units(blocks, {0: torch.tensor([1, 5, 9]), 1: torch.arange(20)}),
            "b": NeuronSet.from_units(blocks, {1: torch.tensor([0, 2])})}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = SingleEngine(model, OptimConfig(), INFO)  # has segments: local weight edits
    grids = {mode: deactivation_grid(engine, blocks, sets, {"a": ev, "b": ev}, 0, 4, 0,
                                     log=lambda *_: None, mode=mode)
             for mode in ("activation", "weights")}
    a, w = grids["activation"], grids["weights"]
    assert a["mode"] == "activation" and w["mode"] == "weights"
    assert a["loss"] == w["loss"] and a["task_neurons_off"] == w["task_neurons_off"]
    assert a["loss"]["task_neurons_off"][0] != a["loss"]["baseline"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="deactivation_mode"):
        deactivation_grid(FakeEngine(model), blocks, sets, {"a": ev}, 0, 4, 0, mode="weight")


INFO = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))


def test_task_metric_scores_every_cell_by_the_tasks_own_measure():
    # The paper scores by each task's own measure; here a continuous stand-in that
    # `evaluate_task` computes: the mean rank-classification margin over the answers.
    model, tok, blocks = _tiny(seed=0, mlp_bias=False)
    words = SAMPLE_TEXT.split()
    raw = {name: [Example(" ".join(words[i : i + 6]), words[i + 6]) for i in starts]
           for name, starts in (("a", range(0, 40, 7)), ("b", range(3, 40, 6)))}
    encoded = {name: encode(ex, tok, 32) for name, ex in raw.items()}

    def measure(engine):
        out = []
        for t in ("a", "b"):
            labels = sorted({ex.answer for ex in raw[t]})
            margins = evaluate_task(engine, tok, raw[t], format="classification",
                                    labels=labels, batch_size=4, max_length=32)["margins"]
            out.append(sum(margins) / len(margins))
        return out

    every = {b.layer: torch.arange(b.d_ff) for b in blocks}
    sets = {"a": NeuronSet.from_units(blocks, every),
            "b": NeuronSet.from_units(blocks, {1: torch.tensor([0, 3])})}
    engine = FakeEngine(model)
    grid = deactivation_grid(engine, blocks, sets, encoded, 0, 4, 0, log=lambda *_: None,
                             task_metric=measure)
    own = grid["task_metric"]
    assert own["tasks"] == ["a", "b"] and "own evaluation measure" in own["metric"]
    assert own["baseline"] == measure(engine)
    assert len(own["task_neurons_off"]) == len(own["random_off"]) == 2
    with deactivate_activations(engine, blocks, every):
        assert own["task_neurons_off"][0] == measure(engine)
    assert own["task_neurons_off"][0] != own["baseline"]  # every MLP unit off: changed
    # beside it, unchanged: teacher-forced accuracy
    assert grid["metric"] == "teacher-forced answer accuracy"
    assert "task_metric" not in deactivation_grid(engine, blocks, sets, encoded, 0, 4, 0,
                                                  log=lambda *_: None)
