import numpy as np
import pytest
import torch

from ncft.arch import get_adapter
from ncft.data.examples import Example, encode
from ncft.scoring.groups import row_groups, unit_groups
from ncft.studies.utilization import hidden_state_site, pearson_scores
from tests.support.fake_engine import FakeEngine, ThreadWorld
from tests.support.tiny import SAMPLE_TEXT, tiny_llama, word_tokenizer


def _data():
    tok = word_tokenizer(SAMPLE_TEXT.split())
    words = SAMPLE_TEXT.split()
    ex = [Example(" ".join(words[i : i + 6]), words[i + 6]) for i in range(0, 60, 7)]
    return tok, encode(ex, tok, 32)


def test_sites():
    model = tiny_llama(seed=0, mlp_bias=False)
    blocks = get_adapter(model).mlp_blocks(model)
    unit = unit_groups(blocks, ["gate", "up", "down"])[0]
    assert hidden_state_site(unit) == (blocks[0].down_fqn, "input")
    rows = row_groups(model, ["down"])[0]
    assert hidden_state_site(rows) == (blocks[0].down_fqn, "output")


def test_scores_match_numpy_corrcoef_and_two_ranks():
    model = tiny_llama(seed=0, mlp_bias=False).eval()
    tok, enc = _data()
    blocks = get_adapter(model).mlp_blocks(model)
    groups = row_groups(model, ["up"]) + unit_groups(blocks, ["gate", "up", "down"])
    # reference: capture activations at the same sites, one example at a time
    acts = {g.name: [] for g in groups}
    handles = []
    for g in groups:
        fqn, site = hidden_state_site(g)
        mod = model.get_submodule(fqn)
        if site == "input":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, n=g.name: acts[n].append(a[0][0])))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=g.name: acts[n].append(o[0])))
    with torch.no_grad():
        for e in enc:
            model(input_ids=e["input_ids"][None], attention_mask=e["attention_mask"][None])
    for h in handles:
        h.remove()
    one = pearson_scores(FakeEngine(model), groups, enc, batch_size=3, pad_id=0,
                         max_elements=40 * 40)  # forces several passes
    for g in groups:
        x = torch.cat(acts[g.name]).double().numpy()
        c = np.corrcoef(x.T)
        np.fill_diagonal(c, -np.inf)
        assert one[g.name].numpy() == pytest.approx(c.max(1), abs=1e-6), g.name
    two = ThreadWorld(2).run(model, lambda eng: pearson_scores(eng, groups, enc, 2, 0))
    for g in groups:
        assert torch.allclose(two[0][g.name], one[g.name], atol=1e-9)
        assert torch.equal(two[0][g.name], two[1][g.name])


@pytest.mark.gpu
def test_scores_on_the_engines_cuda_device_match_cpu():
    # moments accumulate on the engine's device (no host copies of activations); the
    # scores come back on the CPU and agree with a CPU run
    model = tiny_llama(seed=0, mlp_bias=False).eval()
    tok, enc = _data()
    blocks = get_adapter(model).mlp_blocks(model)
    groups = row_groups(model, ["gate", "up", "down"]) + unit_groups(blocks)
    cpu = pearson_scores(FakeEngine(model), groups, enc, batch_size=4, pad_id=0)
    gpu = pearson_scores(FakeEngine(model.cuda()), groups, enc, batch_size=4, pad_id=0)
    for g in groups:
        assert gpu[g.name].device.type == "cpu"
        assert torch.allclose(gpu[g.name], cpu[g.name], atol=1e-4), g.name
