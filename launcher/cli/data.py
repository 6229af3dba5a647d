"""`ncft data ...`: a spec's task data as the model sees it.

- `data show SPEC [key=value ...] --task NAME [--split train|test] [--limit N] [--json]`:
  each example's decoded prompt (after truncation, special tokens included), its
  answer, the prompt and answer token counts and whether the input text was cut.
- `data stats SPEC [key=value ...] [--json]`: per task and split, how many prompts
  are cut and the share of input-text tokens kept, beside the `max_length` the
  task's fixed parts need (`ncft.continual.task.check_room`).

Both read the spec's model tokenizer (a built-in model is converted once, as
`ncft run` does) and encode exactly as training does (`ncft.data.examples.encode`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

SPLITS = ("train", "test")


def add_data_commands(subparsers) -> None:
    """Register `data show|stats` on the top-level subparsers."""
    from launcher.cli.main import _add_spec_command

    data = subparsers.add_parser("data", help="see a spec's task data as the model sees it")
    sub = data.add_subparsers(dest="data_command", required=True)
    show = _add_spec_command(sub, "show", "decoded prompts, answers, token counts, cuts",
                             _show)
    show.add_argument("--task", required=True, help="name of the spec task")
    show.add_argument("--split", choices=SPLITS, default="test",
                      help="train, or test: the task's evaluation rows (default)")
    show.add_argument("--limit", type=int, default=5, help="examples shown (default: 5)")
    show.add_argument("--json", action="store_true", help="a JSON list of objects")
    stats = _add_spec_command(sub, "stats", "per task: prompts cut, share of text tokens "
                              "kept", _stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _load(ns: argparse.Namespace):
    """The spec, its tokenizer and its tasks' data (`launcher.run.task_data.load_task`)."""
    from transformers import AutoTokenizer

    from launcher.run.models import resolve_model
    from launcher.run.task_data import load_task
    from launcher.spec import load_spec
    from ncft.continual.task import check_room

    spec = load_spec(ns.spec, ns.overrides)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec.model.name_or_path))
    wanted = getattr(ns, "task", None)
    names = [t.name for t in spec.tasks]
    if wanted is not None and wanted not in names:
        raise ValueError(f"--task {wanted}: the spec's tasks are {names}")
    tasks = [load_task(t, spec.data_root) for t in spec.tasks if wanted in (None, t.name)]
    check_room(tasks, tokenizer)  # names the task and the max_length it needs
    return tokenizer, tasks


def shown(tokenizer, task, split: str, limit: int | None) -> list[dict[str, Any]]:
    """What `data show` prints for the first `limit` examples of one task's split."""
    from ncft.data.examples import encode_one

    rows = []
    examples = task.train if split == "train" else task.test
    for i, ex in enumerate(examples[:limit]):
        enc, fitted = encode_one(ex, tokenizer, task.max_length)
        rows.append({
            "index": i, "prompt": tokenizer.decode(fitted.ids), "answer": ex.answer,
            "tokens": {"prompt": len(fitted.ids),
                       "answer": int(enc["input_ids"].numel()) - len(fitted.ids)},
            "truncated": fitted.truncated,
            "text_tokens": {"total": fitted.text_tokens, "kept": fitted.kept_tokens},
        })
    return rows


def _show(ns: argparse.Namespace) -> int:
    if ns.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {ns.limit}")
    tokenizer, (task,) = _load(ns)
    rows = shown(tokenizer, task, ns.split, ns.limit)
    if ns.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for row in rows:
        tokens = row["tokens"]
        cut = ("text cut: {kept} of {total} tokens kept".format(**row["text_tokens"])
               if row["truncated"] else "text not cut")
        print(f"--- {task.name} {ns.split} #{row['index']}: prompt {tokens['prompt']} tokens, "
              f"answer {tokens['answer']} tokens, {cut}")
        print(row["prompt"])
        print(f">>> answer: {row['answer']}")
    return 0


def task_stats(tokenizer, task) -> dict[str, Any]:
    """Per split: examples, prompts cut, share of input-text tokens kept; the length needed."""
    from ncft.data.examples import required_length

    out: dict[str, Any] = {"task": task.name, "max_length": task.max_length}
    answers = task.labels if task.format == "classification" else None
    out["fixed_parts_need"] = required_length([*task.train, *task.test], tokenizer, answers)
    for split in SPLITS:
        rows = shown(tokenizer, task, split, None)
        total = sum(r["text_tokens"]["total"] for r in rows)
        kept = sum(r["text_tokens"]["kept"] for r in rows)
        out[split] = {"examples": len(rows), "cut": sum(r["truncated"] for r in rows),
                      "text_tokens": total, "text_kept": kept,
                      "share_kept": kept / total if total else 1.0}
    return out


def _stats(ns: argparse.Namespace) -> int:
    tokenizer, tasks = _load(ns)
    stats = [task_stats(tokenizer, task) for task in tasks]
    if ns.json:
        print(json.dumps(stats, indent=2))
        return 0
    print("| task | max_length | fixed parts need | train cut | train text kept | "
          "test cut | test text kept |")
    print("|---|---|---|---|---|---|---|")
    for s in stats:
        cells = [f"{s[sp]['cut']}/{s[sp]['examples']} | {s[sp]['share_kept']:.1%}"
                 for sp in SPLITS]
        print(f"| {s['task']} | {s['max_length']} | {s['fixed_parts_need']} | "
              + " | ".join(cells) + " |")
    return 0
