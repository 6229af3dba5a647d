import torch

from ncft.arch import get_adapter
from ncft.data.examples import Example, encode
from ncft.neuron_set import NeuronSet
from ncft.studies.deactivation import deactivation_grid
from tests.support.fake_engine import FakeEngine
from tests.support.tiny import SAMPLE_TEXT, tiny_llama, word_tokenizer


def test_grid_shapes_and_all_units_off_vs_none():
    model = tiny_llama(seed=0, mlp_bias=False).eval()
    tok = word_tokenizer(SAMPLE_TEXT.split())
    blocks = get_adapter(model).mlp_blocks(model)
    words = SAMPLE_TEXT.split()
    eval_a = encode([Example(" ".join(words[i : i + 6]), words[i + 6]) for i in range(0, 60, 7)],
                    tok, 32)
    eval_b = encode([Example(" ".join(words[i : i + 5]), words[i + 5]) for i in range(3, 60, 6)],
                    tok, 32)
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
