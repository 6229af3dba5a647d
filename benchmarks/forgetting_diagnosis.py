"""Why does the first task collapse after the second? (#14's sst2 -> agnews diagnosis)

For a finished two-or-more-stage run with rank classification (`eval.classification:
rank`, which keeps every label's log-probability margin), this reads the first task's
results and checkpoints and reports, after every stage:

1. **Prediction counts per class** (`ncft.analysis.bootstrap.prediction_counts`): does
   accuracy fall because every example gets one label?
2. **Margins and ranking quality.** For a two-label task, `s = score(label 0) -
   score(label 1)` per example (from the stored margins). AUC of `s` against the gold
   label measures whether the model still ORDERS the examples correctly; the median
   of `s` is the decision bias. High AUC with accuracy near chance means the
   information is there and only the threshold moved (a label-prior shift).
3. **The first task's units on its own inputs.** With the base model, the model after
   stage 1 and after the last stage, forward the first task's evaluation prompts and
   read each unit's activation (the input of `down_proj`) at the last prompt token,
   for the first task's units, the last task's units, and as many random units of the
   same layers (seeded; a run without NeuronSets gets 5% random units per layer).
   Per group: the relative change of the activations from
   stage 1 to the end; the correlation, over units, of each unit's class separation
   (d', difference of class means over the pooled std) between the two; and the
   accuracy of a ridge probe fit on stage-1 activations, applied unchanged at the end
   (does the old read-out still work?) and refit at the end (is the information still
   there?), with 2-fold cross-fitting.

4. **Content-free calibration** (`--calibrate`; Zhao et al. 2021, "Calibrate Before
   Use", ICML, §4): the variant the margins point to. After each stage the model scores
   the task's labels for the task's own template filled with content-free texts
   ("N/A", "", "[MASK]"); the label probabilities, normalised over the labels and
   averaged over those inputs, are the model's prior, and each example's label scores
   are divided by it (for two labels: `s - s_cf`). It needs no test inputs and no
   gold labels; `eval.calibration: content_free` applies it inside a run.

Run (after `benchmarks/evidence.py run` made the diagnosis runs):

    python benchmarks/forgetting_diagnosis.py runs/evidence/diag_ncft --out diag_ncft.json
    python benchmarks/forgetting_diagnosis.py runs/evidence/diag_ncft --margins-only \
        --calibrate --out diag_ncft_calibrated.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoTokenizer

from launcher.dist import DistInfo
from launcher.engines import OptimConfig, build_engine
from launcher.run.backend import load_stage_model
from launcher.run.models import resolve_model
from launcher.run.task_data import load_task
from launcher.spec.schema import load_spec
from ncft.analysis.bootstrap import prediction_counts
from ncft.arch import get_adapter
from ncft.continual.methods import method
from ncft.data.prompt import prompt_ids
from ncft.evaluate import CONTENT_FREE, label_prior
from ncft.lora import merge_lora
from ncft.neuron_set import NeuronSet
from ncft.run_paths import RunPaths


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive` (ties count 1/2)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def signed_scores(detail: dict, gold: list[str], labels: list[str]) -> tuple[np.ndarray, ...]:
    """`(s, sign)` of a two-label evaluation: `s = score(label 0) - score(label 1)` per
    example (from the stored margins), `sign` +1 where the gold label is label 0."""
    sign = np.asarray([1.0 if g == labels[0] else -1.0 for g in gold])
    return np.asarray(detail["margins"]) * sign, sign


def margin_report(results: dict, task: str, gold: list[str], labels: list[str]) -> list[dict]:
    """Per stage: accuracy, mean margin, and for two labels the AUC and bias of s."""
    out = []
    for stage, detail in enumerate(results["details"][task]):
        if not detail or "margins" not in detail:
            out.append(None)
            continue
        margins = np.asarray(detail["margins"])
        row = {"stage": stage, "after": results["tasks"][stage], "accuracy": detail["accuracy"],
               "mean_margin": float(margins.mean())}
        if len(labels) == 2:
            s, sign = signed_scores(detail, gold, labels)
            # Thresholding s at its own median instead of 0 removes a shift of the
            # label prior without using labels: what a calibrated read-out could reach.
            median_cut = np.where(s > np.median(s), 1.0, -1.0)
            row.update({"auc": auc(s, sign > 0), "median_s": float(np.median(s)),
                        "accuracy_at_median_threshold": float((median_cut == sign).mean()),
                        "mean_s_by_gold": {labels[0]: float(s[sign > 0].mean()),
                                           labels[1]: float(s[sign < 0].mean())}})
        out.append(row)
    return out


ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo",
                    device=torch.device("cpu"))


def content_free_s(model, tokenizer, task) -> float:
    """`log p_cf(label 0) - log p_cf(label 1)`: the model's label prior on empty inputs.

    What `eval.calibration: content_free` divides by (`ncft.evaluate.label_prior` over
    the template filled with `CONTENT_FREE`).
    """
    engine = build_engine("single", model, OptimConfig(), ONE_RANK)
    prompts = [task.render(text) for text in CONTENT_FREE]
    prior_K = label_prior(engine, tokenizer, prompts, task.labels, 8, task.max_length)
    return float(prior_K[0] - prior_K[1])


def calibrated(margins: list[dict | None], details: list[dict | None], s_cf: dict[int, float],
               gold: list[str], labels: list[str]) -> None:
    """Add each stage's content-free shift and calibrated accuracy to its margin row.

    `details` are the task's per-stage evaluations (`results["details"][task]`), which
    the rows of `margins` were made from.
    """
    for row in margins:
        if row is None or row["stage"] not in s_cf:
            continue
        s, sign = signed_scores(details[row["stage"]], gold, labels)
        shifted = s - s_cf[row["stage"]]
        row.update({"content_free_s": s_cf[row["stage"]],
                    "accuracy_calibrated": float((np.where(shifted > 0, 1.0, -1.0) == sign)
                                                 .mean())})


def activations(model, tokenizer, prompts: list[str], max_length: int) -> dict[int, torch.Tensor]:
    """`layer -> [N, d_ff]` unit activations at each prompt's last token."""
    blocks = get_adapter(model).mlp_blocks(model)
    modules = dict(model.named_modules())
    grabbed: dict[int, list[torch.Tensor]] = {b.layer: [] for b in blocks}
    hooks = [modules[b.down_fqn].register_forward_pre_hook(
        lambda _m, args, layer=b.layer: grabbed[layer].append(args[0][0, -1].detach().clone()))
        for b in blocks]
    model.eval()
    with torch.no_grad():
        for prompt in prompts:  # one at a time: no padding, the last token is the prompt's
            ids = torch.tensor([prompt_ids(tokenizer, prompt, max_length - 1)])
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {layer: torch.stack(rows) for layer, rows in grabbed.items()}


def gather(acts: dict[int, torch.Tensor], units: dict[int, torch.Tensor]) -> np.ndarray:
    """[N, U] activations of the given units, layers concatenated."""
    return torch.cat([acts[layer][:, idx] for layer, idx in sorted(units.items())], 1).numpy()


def dprime(x: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per unit: difference of class means over the pooled standard deviation."""
    a, b = x[positive], x[~positive]
    pooled = np.sqrt(0.5 * (a.var(0) + b.var(0))) + 1e-8
    return (a.mean(0) - b.mean(0)) / pooled


def probe_accuracy(train_x, train_y, test_x, test_y, ridge: float = 1.0) -> float:
    """Ridge regression on +-1 targets (features standardised on the training side)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    a1 = np.hstack([a, np.ones((len(a), 1))])
    w = np.linalg.solve(a1.T @ a1 + ridge * np.eye(a1.shape[1]), a1.T @ train_y)
    pred = np.hstack([b, np.ones((len(b), 1))]) @ w
    return float(((pred > 0) == (test_y > 0)).mean())


def unit_report(before: np.ndarray, after: np.ndarray, positive: np.ndarray) -> dict:
    """How one group of units changed on the first task's inputs (module docstring)."""
    y = np.where(positive, 1.0, -1.0)
    half = np.arange(len(y)) % 2 == 0  # 2-fold cross-fitting over examples
    kept, refit, base = [], [], []
    for train, test in ((half, ~half), (~half, half)):
        base.append(probe_accuracy(before[train], y[train], before[test], y[test]))
        kept.append(probe_accuracy(before[train], y[train], after[test], y[test]))
        refit.append(probe_accuracy(after[train], y[train], after[test], y[test]))
    d0, d1 = dprime(before, positive), dprime(after, positive)
    return {
        "units": int(before.shape[1]),
        "relative_change": float(np.linalg.norm(after - before) / np.linalg.norm(before)),
        "mean_abs_activation": [float(np.abs(before).mean()), float(np.abs(after).mean())],
        "dprime_mean_abs": [float(np.abs(d0).mean()), float(np.abs(d1).mean())],
        "dprime_correlation": float(np.corrcoef(d0, d1)[0, 1]),
        "probe_accuracy_stage1": float(np.mean(base)),
        "probe_fit_stage1_applied_at_end": float(np.mean(kept)),
        "probe_refit_at_end": float(np.mean(refit)),
    }


def _model(spec, path: str, run: RunPaths, stage: int | None):
    """The run's model after `stage` (None: the base), adapters merged: the product's loader."""
    weights = None if stage is None else \
        run.stage_dir(stage, spec.tasks[stage].name) / "model.safetensors"
    model = load_stage_model(spec, path, stage, weights)
    if method(spec.method).lora:
        model = merge_lora(model)
        # peft froze the base weights; the engines below (evaluation only) want what
        # from_pretrained gives, trainable parameters to build an optimizer over.
        model.requires_grad_(True)
    return model


def main(argv: list[str] | None = None) -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--margins-only", action="store_true",
                        help="only prediction counts and margins (no model forwards)")
    parser.add_argument("--examples", type=int, default=None,
                        help="first-task prompts to forward (default: all evaluated)")
    parser.add_argument("--calibrate", action="store_true",
                        help="content-free calibration after every stage (two-label tasks)")
    args = parser.parse_args(argv)
    layout = RunPaths(Path(args.run))
    results = json.loads(layout.results.read_text())
    spec = load_spec(layout.spec)
    first, last = spec.tasks[0], spec.tasks[-1]
    data = load_task(first, spec.data_root)
    examples = data.test[: spec.eval.max_examples or len(data.test)][: args.examples]
    gold = [ex.answer for ex in examples]
    scored = gold[: len(results["details"][first.name][0]["correct"])]  # what was evaluated
    report: dict = {"run": str(args.run), "method": results["method"], "task": first.name,
                    "prediction_counts": prediction_counts(
                        results, {first.name: first.labels})[first.name],
                    "margins": margin_report(results, first.name, scored, first.labels)}
    path = resolve_model(spec.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.calibrate:
        if len(first.labels) != 2:
            raise ValueError(f"--calibrate: {first.name} has {len(first.labels)} labels; "
                             "the diagnosis calibrates two-label tasks")
        s_cf = {}
        for stage in range(len(spec.tasks)):
            s_cf[stage] = content_free_s(_model(spec, path, layout, stage), tokenizer, first)
        calibrated(report["margins"], results["details"][first.name], s_cf, scored,
                   first.labels)
    if args.margins_only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(yaml.safe_dump(report["margins"], sort_keys=False))
        return
    positive = np.asarray([g == first.labels[0] for g in gold])
    prompts = [ex.prompt for ex in examples]
    stages = {"base": None, "stage1": 0, "end": len(spec.tasks) - 1}
    acts = {k: activations(_model(spec, path, layout, stage), tokenizer, prompts,
                           first.max_length)
            for k, stage in stages.items()}
    model = _model(spec, path, layout, None)
    blocks = get_adapter(model).mlp_blocks(model)
    groups = {}
    gen = torch.Generator().manual_seed(0)
    if layout.neuron_file(first.name).is_file():
        groups[f"{first.name} units"] = NeuronSet.load(layout.neuron_file(first.name)).units(blocks)
        groups[f"{last.name} units"] = NeuronSet.load(layout.neuron_file(last.name)).units(blocks)
        sizes = {layer: len(idx) for layer, idx in groups[f"{first.name} units"].items()}
    else:  # no NeuronSet (full fine-tuning, LoRA): 5% of each layer's units at random
        sizes = {b.layer: max(1, round(0.05 * b.d_ff)) for b in blocks}
    # As many random units per layer (a probe over every unit would need a
    # units x units solve: 46k x 46k for SmolLM2).
    groups["random units"] = {layer: torch.randperm(blocks[layer].d_ff, generator=gen)[:k]
                              for layer, k in sizes.items()}
    report["units"] = {
        name: {"base_to_stage1": unit_report(gather(acts["base"], u), gather(acts["stage1"], u),
                                             positive),
               "stage1_to_end": unit_report(gather(acts["stage1"], u), gather(acts["end"], u),
                                            positive)}
        for name, u in groups.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(yaml.safe_dump({"prediction_counts": report["prediction_counts"],
                          "margins": report["margins"]}, sort_keys=False))
    for name, rows in report["units"].items():
        end = rows["stage1_to_end"]
        print(f"{name}: change {end['relative_change']:.3f}, d' corr "
              f"{end['dprime_correlation']:.3f}, probe kept "
              f"{end['probe_fit_stage1_applied_at_end']:.3f}, refit {end['probe_refit_at_end']:.3f}"
              f" (stage 1: {end['probe_accuracy_stage1']:.3f})")


if __name__ == "__main__":
    main()
