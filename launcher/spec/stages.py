"""A spec's stages in words (`ncft validate`, the run's log), and which studies run.

Read by `ncft validate` (the lines printed under a resolved spec) and by the run
(`records_rank_shift`, `records_neft_utilization` decide whether a study runs), so
what a user reads before submitting is what the run does. ("Plan" in this project
means the memory planner, `launcher.plan`; this module only describes.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ncft.continual.methods import method

if TYPE_CHECKING:
    from launcher.spec import EngineSpec, Spec
    from launcher.spec.tasks import TaskSpec


# Scorers that run NeFT's weight-cosine probe (and save its scores for the rank shift).
COSINE_SCORERS = ("weight_cosine", "reversed", "neft_plus_reversed")


def records_rank_shift(spec: Spec, name: str) -> bool:
    """Whether a run of method `name` records the selection probe's weight-movement rank shift."""
    return (spec.study.weight_movement_rank_shift
            and spec.selection.scorer in COSINE_SCORERS
            and method(name).selects)


def records_neft_utilization(spec: Spec) -> bool:
    """Whether the run measures NeFT §6.1 utilization (`study.neft_utilization`)."""
    on = spec.study.neft_utilization
    if on is None:
        on = spec.selection.scorer in COSINE_SCORERS
    return on and method(spec.method).selects


def describe_studies(spec: Spec) -> list[str]:
    """Lines of the studies run after the sequence (NeFT utilization, similarity)."""
    st, out = spec.study, []
    if records_neft_utilization(spec):
        out.append(f"NeFT utilization (§6.1): max Pearson scores on {st.eval_examples} "
                   "examples per task, before and after each task; ΔRank, categories")
    if st.similarity in ("paper", "both"):
        out.append(f"similarity (Leng & Xiong Fig. 3): per task, {st.finetune_steps} steps "
                   "of full fine-tuning from the base, P_i vs P_j per layer, every task scored")
    return out


def describe_stages(spec: Spec) -> list[str]:
    """Human-readable stages a run of `spec` will go through (for `ncft validate`).

    Returns:
        One line per stage: per task what is selected and trained, then evaluations,
        then the final outputs.

    """
    n = len(spec.tasks)
    where = _where(spec.engine)
    row = method(spec.method)
    stages = []
    if spec.study.deactivation:
        stages.append(f"study: tune every parameter {spec.study.finetune_steps} steps on all "
                      "tasks, select each task's units, switch them off "
                      f"({spec.study.deactivation_mode}) vs random units "
                      f"({spec.study.eval_examples} examples per task)")
        if spec.study.finetune_matrix:
            stages.append(f"study: per task, train only its units {spec.study.finetune_steps} "
                          "steps from the base model, score every task (fine-tuning matrix)")
    every = spec.output.checkpoint_every
    for i, task in enumerate(spec.tasks, start=1):
        what = _train_what(spec, i)
        stages.append(f"task {i}/{n} {task.name}: {what} for {_amount(spec, task)} {where}")
        if row.mixes:
            stages.append(f"task {i}/{n} {task.name}: store NeuronSet and task vector "
                          f"({spec.wncft.num_samples} samples)")
        if row.continual:
            query = ("each example's own prompt vector" if spec.wncft.query == "example"
                     else "the evaluated task's vector")
            mix = (f", mixing earlier tasks' neurons (softmax T={spec.wncft.temperature}, "
                   f"query: {query})" if row.mixes and i > 1 else "")
            which = {"all": f"all {n} tasks", "current": task.name,
                     "seen": f"the {i} task(s) seen so far"}[spec.eval.tasks]
            stages.append(f"eval after task {i} on {which}{mix}")
        else:
            stages.append(f"eval on {task.name}")
        stages.append(f"checkpoint after task {i}"
                      + (f" (and every {every} steps within it, per-rank shards)"
                         if every else ""))
    if records_rank_shift(spec, spec.method):
        stages.append(f"weight-movement rank shift: repeat the {spec.selection.cosine_steps}-"
                      "step probe on each task's trained model")
    stages += describe_studies(spec)
    if spec.eval.zero_shot:
        stages.insert(0, "zero-shot: evaluate the base model on every task (forward "
                      "transfer's baseline)")
    fg = "FG (eq. 5, vs eval.reference)" if spec.eval.reference else "retention (no FG)"
    stages.append(f"write {spec.output.dir}/results.json"
                  + (f" (accuracy matrix, CL, BWT, {fg}, forgetting)" if n > 1 else ""))
    stages.append(f"save consolidated model to {spec.output.dir}/final")
    if spec.output.report:
        stages.append(f"write analyses and plots to {spec.output.dir}/plots")
    return stages


def _where(engine: EngineSpec) -> str:
    if engine.world_size == 1:
        return f"in 1 process ({engine.backend})"
    nodes = f" on {engine.nnodes} nodes" if engine.nnodes > 1 else ""
    return f"on {engine.world_size} ranks{nodes} ({engine.backend})"


def _amount(spec: Spec, task: TaskSpec) -> str:
    t = spec.training
    if t.steps is not None:
        return f"{t.steps} steps"
    return f"{t.epochs} epoch(s) of <= {task.train_size} examples"


def _train_what(spec: Spec, i: int) -> str:
    row = method(spec.method)
    if row.trains == "all":
        return ("from the base model, " if row.continual and row.from_base else "") + \
            "train all parameters"
    if row.lora:
        on = f"LoRA r={spec.lora.r} on {'/'.join(spec.lora.target_modules)}"
        if not row.adapter_per_task:
            return f"train {on}"
        return (f"train a new {on} (O-LoRA: earlier adapters frozen, orthogonality weight "
                f"{spec.olora.lambda_orth}, L2 weight {spec.olora.lambda_l2})")
    sel = spec.selection
    scorer = "random" if row.random else sel.scorer
    amount = f"{100 * sel.fraction:.4g}%" if sel.fraction is not None else f"top {sel.count}"
    unit = "neurons" if sel.unit == "neuron" else "weight rows"
    scope = "per layer" if sel.per_layer else "global"
    steps = f" after {sel.cosine_steps} full-FT steps" if scorer in COSINE_SCORERS else ""
    union = " + earlier tasks' neurons" if sel.union_with_previous and i > 1 else ""
    keep = ""
    if spec.training.unit_distill_weight and i > 1:
        keep = (f", keeping earlier tasks' units' activations on this task's inputs "
                f"(unit_distill_weight {spec.training.unit_distill_weight}, ncft's own)")
    return (f"score {unit} ({scorer}{steps}, {amount} {scope} of {'/'.join(sel.modules)})"
            f", train only them{union}{keep}")
