"""Cost of rank classification: one forward per (prompt, label) vs a shared prompt prefix.

On the first `--examples` dbpedia test prompts (14 labels, O-LoRA's prompt, the
`max_length` of `examples/evidence_o1_smollm2.yaml`) and SmolLM2-135M-Instruct (the
evidence runs' model), time
  * per_label: every (prompt, label) sequence encoded and run in full, `--batch`
    sequences per forward (how `ncft.evaluate.label_scores` scored before #23, with
    today's prompt room per label), and
  * shared:    `ncft.evaluate.label_scores` today: each prompt once with the KV
    cache, then all 14 label continuations from that cache (`--batch` prompts per
    group).
Both run on the single engine in one process. They alternate A B B A ... after one
warm-up each, so drift from other load on the machine cancels; the ratio of median
times is reported, with the largest score difference between the two paths.

Run:

    OMP_NUM_THREADS=1 python benchmarks/rank_eval.py --examples 8 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.dist import DistInfo  # noqa: E402
from launcher.engines import OptimConfig, build_engine  # noqa: E402
from launcher.run.models import resolve_model  # noqa: E402
from launcher.run.task_data import load_task  # noqa: E402
from launcher.spec.schema import load_spec  # noqa: E402
from ncft.data.examples import Example, collate, encode, pad_id  # noqa: E402
from ncft.engine import Engine, device_of, eval_mode, logits_of  # noqa: E402
from ncft.evaluate import _answer_logprobs, _label_limits, label_scores  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "examples" / "evidence_o1_smollm2.yaml"


def per_label_scores(engine: Engine, tokenizer, examples, labels, batch_size: int,
                     max_length: int) -> torch.Tensor:
    """The per-label path `label_scores` replaced (one process): float64 [N, K].

    Each label gets the prompt room `label_scores` gives it (`_label_limits`), so the
    two paths score the same sequences and their scores can be compared.
    """
    limits = _label_limits(tokenizer, examples[0].prompt, labels, max_length, True)
    pairs = [encode([Example(ex.prompt, label)], tokenizer, limit)[0]
             for ex in examples for label, limit in zip(labels, limits)]
    device, pad = device_of(engine), pad_id(tokenizer)
    scores = []
    with torch.no_grad(), eval_mode(engine.module):
        for b in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate(pairs[b : b + batch_size], pad).items()}
            output = engine.forward({"input_ids": batch["input_ids"],
                                     "attention_mask": batch["attention_mask"],
                                     "use_cache": False})
            scores.append(_answer_logprobs(logits_of(output), batch["labels"]))
    return torch.cat(scores).view(len(examples), len(labels)).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2, help="measured A/B pairs")
    parser.add_argument("--model", default=None, help="model.name_or_path (default: the "
                        "evidence spec's, SmolLM2-135M-Instruct)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="dbpedia's max_length (default: the evidence spec's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [f"model.name_or_path={args.model}"] if args.model else []
    if args.max_length:
        overrides.append(f"tasks.0.max_length={args.max_length}")
    spec = load_spec(SPEC, overrides)
    task = load_task(spec.tasks[0], spec.data_root)
    examples, labels, max_length = task.test[: args.examples], task.labels, task.max_length
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo",
                    device=torch.device("cpu"))
    engine = build_engine("single", model, OptimConfig(), info)
    runs = {
        "per_label": lambda: per_label_scores(engine, tokenizer, examples, labels,
                                              args.batch, max_length),
        "shared": lambda: label_scores(engine, tokenizer, examples, labels, args.batch,
                                       max_length),
    }
    scores = {name: run() for name, run in runs.items()}  # warm-up, and the check
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.pairs):
        for name in (("per_label", "shared") if i % 2 == 0 else ("shared", "per_label")):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "task": task.name, "labels": len(labels), "examples": len(examples),
        "max_length": max_length, "batch": args.batch, "pairs": args.pairs,
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "speedup": round(median["per_label"] / median["shared"], 2),
        "max_abs_score_diff": float((scores["shared"] - scores["per_label"]).abs().max()),
        "same_predictions": bool(torch.equal(scores["shared"].argmax(1),
                                             scores["per_label"].argmax(1))),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }, indent=1))


if __name__ == "__main__":
    main()
