"""Unit-level distillation without old data (`ncft.continual.distill`, ncft's own).

On the tiny Llama with the single engine: the penalty is 0 at the first step and
positive after a large step, and its gradient reaches the trainable units; a 2-task
NCFT run through the loop keeps the first task's units' activations on the second
task's inputs closer with the penalty than without; a stage killed mid-task and resumed
trains to the very weights of an uninterrupted one (references from the stage's start).
"""

from __future__ import annotations

import copy
from itertools import islice

import pytest
import torch

from launcher.dist import DistInfo
from launcher.engines import OptimConfig, build_engine
from ncft.arch import get_adapter
from ncft.continual.config import LoopConfig
from ncft.continual.distill import earlier_units, unit_distill
from ncft.continual.loop import ContinualLoop
from ncft.continual.state import LoopState
from ncft.continual.task import TaskData
from ncft.data.examples import Example
from ncft.masks.install import freeze_unselected, install
from ncft.neuron_set import NeuronSet, Selection
from ncft.sparse_delta import is_delta_fqn
from ncft.train import train
from tests.support.loop_config import loop_config
from tests.support.tiny import SAMPLE_TEXT, VOCAB, tiny_llama, word_tokenizer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
# Task 0 and task 1 share units 6..11 of each layer: the overlap is where training
# task 1 moves task 0's units most directly.
UNITS = [{0: torch.arange(0, 12), 1: torch.arange(0, 12)},
         {0: torch.arange(6, 18), 1: torch.arange(6, 18)}]


def _blocks(model):
    return get_adapter(model).mlp_blocks(model)


def _single(model, lr: float):
    return build_engine("single", model, OptimConfig(lr=lr), CPU)


def _padded_steps(num_steps: int, seed: int) -> list[list[dict]]:
    """One micro-batch of 3 examples per step, the last two padded at the end."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        ids = torch.randint(4, VOCAB, (3, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        mask[2, 4:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append([{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                     "labels": labels}])
    return out


def test_penalty_is_zero_at_the_start_positive_after_a_step_and_reaches_the_units():
    model = tiny_llama(seed=0)
    blocks = _blocks(model)
    trained = NeuronSet.from_units(blocks, UNITS[1])
    freeze_unselected(model, trained.entries)
    engine = _single(model, lr=0.5)
    masks = install(engine, trained.entries)
    steps = _padded_steps(2, seed=1)
    down = [dict(engine.module.named_modules())[b.down_fqn] for b in blocks]
    with unit_distill(engine, blocks, UNITS[0], 1.0, steps) as keeper:
        assert len(keeper.references) == 2 and keeper.references[0].shape == (3, 24)
        assert all(len(m._forward_pre_hooks) == 1 for m in down)
        values = []

        def aux(batch):
            values.append(keeper.aux_loss(batch))
            return values[-1]

        logs = train(engine, steps[:1], masks, aux_loss=aux)
        assert float(values[0].detach()) == 0.0  # the weights of the references, the same inputs
        engine.optimizer.zero_grad(set_to_none=True)
        batch = steps[1][0]
        engine.forward(batch)
        penalty = keeper.aux_loss(batch)
        assert float(penalty.detach()) > 0  # lr 0.5 moved the shared units
        penalty.backward()
    assert logs[0].loss > 0
    assert all(not m._forward_pre_hooks for m in down), "hooks must end with the context"
    up = dict(engine.module.named_parameters())[f"{blocks[1].mlp_fqn}.up_proj.weight"]
    assert up.grad is not None
    assert up.grad[6:12].abs().sum() > 0  # shared units: trainable and distilled
    # A unit that neither trains nor is kept gets no gradient from the penalty.
    assert float(up.grad[20:].abs().sum()) == 0.0


def test_earlier_units_reads_unit_axes_only():
    blocks = _blocks(tiny_llama())
    b0, b1 = blocks
    rows = NeuronSet({f"{b0.mlp_fqn}.up_proj.weight": Selection(0, torch.tensor([3, 5])),
                      f"{b0.mlp_fqn}.down_proj.weight": Selection(0, torch.tensor([1])),
                      f"{b1.mlp_fqn}.down_proj.weight": Selection(0, torch.tensor([2]))})
    units = NeuronSet.from_units(blocks, {1: torch.tensor([7, 3])})
    got = earlier_units([rows, units], blocks)
    # down rows are hidden features, not units: layer 1 has only the unit set's units.
    assert {k: v.tolist() for k, v in got.items()} == {0: [3, 5], 1: [3, 7]}
    assert earlier_units([rows.select([f"{b1.mlp_fqn}.down_proj.weight"])], blocks) == {}


# ---- through the loop --------------------------------------------------------------------

WORDS = SAMPLE_TEXT.split()
TOKENIZER = word_tokenizer(WORDS)


def _task(name: str, seed: int) -> TaskData:
    gen = torch.Generator().manual_seed(seed)
    vocab = sorted(set(WORDS))
    examples = []
    for _ in range(16):
        n = int(torch.randint(3, 9, (1,), generator=gen))
        words = [vocab[int(i)] for i in torch.randint(0, len(vocab), (n + 1,), generator=gen)]
        examples.append(Example(" ".join(words[:-1]), words[-1]))
    return TaskData(name, "generation", None, examples, [], 16)


TASKS = [_task("first", 1), _task("second", 2)]


def _cfg(weight: float, steps: int = 6, update: str = "masked") -> LoopConfig:
    return loop_config(
        training={"lr": 2e-2, "steps": steps, "micro_batch_size": 4, "grad_accum": 2,
                  "update": update, "unit_distill_weight": weight},
        eval={"batch_size": 4})


class Killed(Exception):
    pass


class Backend:
    """Stages, NeuronSets and mid-task progress in memory; the single engine."""

    tokenizer = TOKENIZER

    def __init__(self, kill_at: tuple[int, int] | None = None) -> None:
        self.stages: dict[int, dict] = {}
        self.neurons: dict[str, NeuronSet] = {}
        self.kill_at, self.progress, self.resume_at = kill_at, None, 0
        self.lr = 0.0

    def load_model(self, stage):
        model = tiny_llama(seed=0)
        if stage is not None:
            model.load_state_dict(self.stages[stage])
        return model

    def build_engine(self, model, keep_weights=False):
        return _single(model, self.lr)

    def save_neurons(self, task, nset):
        self.neurons[task] = nset

    def load_neurons(self, task):
        return self.neurons[task]

    def save_stage(self, engine, stage, state):
        self.stages[stage] = {k: v.clone() for k, v in engine.module.state_dict().items()
                              if not is_delta_fqn(k)}

    def resume_step(self, stage):
        return self.resume_at if stage == len(self.stages) else 0

    def restore_progress(self, engine, stage):
        engine.load_local_state(self.progress)

    def after_step(self, engine, stage, step, total):
        if (stage, step) == self.kill_at:
            self.progress = copy.deepcopy(engine.local_state())
            raise Killed

    def after_eval(self, stage, task_index):
        pass

    def log_step(self, stage, task, log, lr):
        pass

    def log_line(self, text):
        pass


class Selector:
    def select(self, engine, model, task, stage):
        return NeuronSet.from_units(_blocks(model), UNITS[stage])


class TrainOnly(ContinualLoop):
    """The loop without evaluation (these tasks have no test examples)."""

    def _evaluate(self, engine, stage, state):
        hooked = [n for n, m in engine.module.named_modules() if m._forward_pre_hooks]
        assert not hooked, f"distillation hooks leaked into evaluation: {hooked}"


def _run(weight: float, backend: Backend | None = None, start_stage: int = 0,
         update: str = "masked") -> Backend:
    cfg = _cfg(weight, update=update)
    backend = backend or Backend()
    backend.lr = cfg.training.lr
    loop = TrainOnly(cfg, TASKS, backend, selector=Selector())
    loop.run(start_stage, LoopState(matrix=[[None] * 2 for _ in range(2)]))
    return backend


def _unit_means(model, units, steps) -> torch.Tensor:
    """Each example's token-mean activation of `units`, every micro-batch, read directly."""
    blocks = [b for b in _blocks(model) if b.layer in units]
    modules = dict(model.named_modules())
    seen = {}
    handles = [modules[b.down_fqn].register_forward_pre_hook(
        lambda m, args, layer=b.layer: seen.__setitem__(layer, args[0])) for b in blocks]
    out = []
    with torch.no_grad():
        for micro_batches in steps:
            for batch in micro_batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].float().unsqueeze(-1)
                out.append(torch.cat([(seen[b.layer][..., units[b.layer]] * mask).sum(1)
                                      / mask.sum(1) for b in blocks], dim=1))
    for h in handles:
        h.remove()
    return torch.cat(out)


@pytest.fixture(scope="module")
def runs() -> dict[float, Backend]:
    return {w: _run(w) for w in (0.0, 1e4)}


def test_penalty_keeps_earlier_units_on_the_current_tasks_inputs(runs):
    plain, kept = runs[0.0], runs[1e4]
    # Stage 0 has no earlier units: both runs train it identically.
    for name, value in plain.stages[0].items():
        assert torch.equal(value, kept.stages[0][name]), name
    loop = TrainOnly(_cfg(0.0), TASKS, plain)
    rank0 = type("E", (), {"rank": 0, "world_size": 1})()
    steps = list(islice(loop.train_steps(rank0, TASKS[1], 1), 6))  # stage 1's own inputs
    drift = {}
    for w, backend in runs.items():
        start = _unit_means(backend.load_model(0), UNITS[0], steps)
        end = _unit_means(backend.load_model(1), UNITS[0], steps)
        drift[w] = float((end - start).pow(2).mean())
    assert drift[0.0] > 0
    assert drift[1e4] < 0.5 * drift[0.0], drift


def test_resumed_stage_equals_uninterrupted(runs):
    killed = Backend(kill_at=(1, 3))
    with pytest.raises(Killed):
        _run(1e4, killed)
    assert sorted(killed.stages) == [0]
    killed.kill_at, killed.resume_at = None, 3
    _run(1e4, killed, start_stage=1)
    for name, value in runs[1e4].stages[1].items():
        assert torch.equal(killed.stages[1][name], value), name


def test_sparse_delta_trains_as_masked_with_the_penalty(runs):
    sparse = _run(1e4, update="sparse_delta")
    for name, value in runs[1e4].stages[1].items():
        torch.testing.assert_close(sparse.stages[1][name], value, atol=1e-5, rtol=0)
