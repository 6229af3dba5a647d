"""The spec's `selection` section as the one selection pipeline, for runs and the CLI.

`spec_selector` builds the `ncft.selection.pipeline.SelectionPipeline` that both
`ncft run` (every stage and study) and `ncft neurons score` use, so the command line
selects exactly what a run's stage selects from the same model. `run_selector` adds
what a run needs from its run directory: the previous task's set and a place for
NeFT's probe scores.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from launcher.spec import Spec
from launcher.spec.stages import records_rank_shift
from ncft.continual.task import TaskData, stage_steps
from ncft.neuron_set import NeuronSet
from ncft.scoring.groups import Scores
from ncft.selection.pipeline import SelectionPipeline
from ncft.studies import score_files

if TYPE_CHECKING:
    from launcher.run.backend import LauncherBackend


def spec_selector(spec: Spec, tokenizer: Any, **options: Any) -> SelectionPipeline:
    """The spec's pipeline; NeFT's probe fine-tunes on the batches a stage trains on.

    Args:
        spec: The validated spec (selection, training's data order, method).
        tokenizer: The model's tokenizer, with a pad token.
        **options: Other `SelectionPipeline` fields (previous, save_probe, reference,
            extra_meta).
    """
    t = spec.training
    steps = partial(stage_steps, tokenizer, seed=t.seed, micro_batch_size=t.micro_batch_size,
                    grad_accum=t.grad_accum)
    return SelectionPipeline(spec.select_config(), tokenizer, steps, spec.method, **options)


def run_selector(spec: Spec, backend: LauncherBackend, tasks: list[TaskData]) -> SelectionPipeline:
    """The run's pipeline, reading and writing the run directory.

    The previous task's set comes from `neurons/`; when NeFT's rank-shift study runs
    (`ncft.studies.run.RunStudies.rank_shift`), rank 0 keeps each selection's probe
    scores in `neft/<task>.before.safetensors`.
    """

    def previous(stage: int) -> NeuronSet | None:
        if stage == 0:
            return None
        return NeuronSet.load(backend.run.neuron_file(tasks[stage - 1].name))

    def earlier(stage: int) -> list[NeuronSet]:
        return [NeuronSet.load(backend.run.neuron_file(t.name)) for t in tasks[:stage]]

    save_probe: Callable[[str, Scores], None] | None = None
    if records_rank_shift(spec, spec.method):

        def save_probe(task: str, scores: Scores) -> None:
            if backend.info.is_main_process:
                score_files.save_scores(backend.run.neft_scores(task, "before"), scores)

    return spec_selector(spec, backend.tokenizer, previous=previous, earlier=earlier,
                         save_probe=save_probe)
