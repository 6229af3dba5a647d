"""Task examples: prompt/answer pairs, tokenized with the loss on the answer only.

Used by scoring (the attribution loss), training and evaluation alike, so one
encoding decides what "the answer tokens" are everywhere.

Encoding contract (`encode`):
- `input_ids = prompt_ids + answer_ids (+ [eos])`, where `prompt_ids` is the
  prompt tokenized WITH the tokenizer's special prefix (BOS for Llama-like
  tokenizers) and `answer_ids` is `" " + answer` tokenized WITHOUT special tokens,
  so a label continues "...Answer:" as " Good" (one leading space, as text would).
- `labels` is -100 on the prompt and equal to the token on the answer (and EOS).
  Padding added by `collate` is -100 too. Models shift labels internally: the logits
  at position `t` are scored against `labels[t + 1]`.
- Over-long examples lose only the task's input text. A task prompt is a `Prompt`
  (`ncft.data.prompt`):
  a `str` that also knows its parts, `head + text + tail` (instruction and options
  before the input text, the `Answer:` cue after it). When prompt + answer exceed
  `max_length`, the input text is cut from its END and the prompt re-assembled
  (`fit_prompt`); the head, the tail and the answer are never cut, and an example
  whose fixed parts alone do not fit raises `ValueError` (`required_length` gives the
  length a task needs). A plain `str` prompt has no known parts: it is cut from the
  LEFT (the first BOS token, if any, is kept), so the text right before the answer
  survives. The answer is never cut in either case.

Everything here is deterministic: no shuffling, no randomness.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ncft.data.prompt import Fitted, Prompt, fit_prompt, fixed_length, render, token_ids

IGNORE = -100  # the label value causal-LM losses skip (HF and torch's cross_entropy)


@dataclass(frozen=True)
class Example:
    """One task example.

    Attributes:
        prompt: Model input text, already built from the task template.
        answer: Target text the model should produce after the prompt.
    """

    prompt: str
    answer: str


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a JSON-lines file (blank lines skipped), the first `limit` rows at most.

    Raises:
        ValueError: If the file is missing or a line is not a JSON object.
    """
    return read_jsonl_lines(path, limit)[0]


def read_jsonl_lines(
    path: str | Path, limit: int | None = None
) -> tuple[list[dict[str, Any]], list[int]]:
    """`read_jsonl`, with each row's physical line number (1-based, blank lines counted).

    So an error about a row can name the line an editor shows.

    Raises:
        ValueError: If the file is missing or a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            rows.append(row)
            lines.append(line_no)
    return rows, lines


def _field(row: Mapping[str, Any], name: str, i: int) -> str:
    if name not in row:
        raise ValueError(f"row {i} has no field {name!r} (fields: {sorted(row)})")
    return str(row[name])


def classification_examples(
    rows: Iterable[Mapping[str, Any]],
    labels: Sequence[str],
    template: str,
    text_field: str = "text",
    label_field: str = "label",
) -> list[Example]:
    """Build classification examples: prompt from `template`, answer = the label string.

    Args:
        rows: Data rows (e.g. from `read_jsonl`).
        labels: The label set, in prompt order.
        template: `str.format` template over `{text}` and `{labels}` (the labels
            joined by ", ").
        text_field: Key of the input text.
        label_field: Key of the label string.

    Raises:
        ValueError: If a row lacks a field or carries a label outside `labels`.
    """
    known = set(labels)
    joined = ", ".join(labels)
    out = []
    for i, row in enumerate(rows):
        label = _field(row, label_field, i)
        if label not in known:
            raise ValueError(f"row {i}: label {label!r} is not one of {list(labels)}")
        out.append(Example(render(template, _field(row, text_field, i), labels=joined), label))
    return out


def generation_examples(
    rows: Iterable[Mapping[str, Any]], template: str, source_field: str, target_field: str
) -> list[Example]:
    """Build generation examples: prompt = `template` over `{text}`, answer = the target."""
    return [
        Example(render(template, _field(row, source_field, i)), _field(row, target_field, i))
        for i, row in enumerate(rows)
    ]


def answer_ids(tokenizer, answer: str, add_eos: bool) -> list[int]:
    """The answer's tokens as `encode` appends them: `" " + answer`, then EOS if asked."""
    ids = token_ids(tokenizer, " " + answer, False)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    return ids


def encode_one(
    ex: Example, tokenizer, max_length: int, add_eos: bool = True
) -> tuple[dict[str, torch.Tensor], Fitted]:
    """One example as `encode` makes it, with its `Fitted` prompt (what was cut).

    Raises:
        ValueError: If the answer, or the answer and the prompt's fixed parts, do not
            fit in `max_length` (the answer needs at least one prompt token before it).
    """
    answer = answer_ids(tokenizer, ex.answer, add_eos)
    if len(answer) >= max_length:
        raise ValueError(f"answer {ex.answer!r} takes {len(answer)} tokens; max_length "
                         f"{max_length} leaves no room for the prompt; raise it")
    fitted = fit_prompt(tokenizer, ex.prompt, max_length - len(answer))
    ids = fitted.ids + answer
    labels = [IGNORE] * len(fitted.ids) + answer
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }, fitted


def required_length(
    examples: Sequence[Example], tokenizer, answers: Sequence[str] | None = None,
    add_eos: bool = True,
) -> int:
    """The smallest `max_length` at which no example's fixed parts would be cut.

    Fixed parts: a `Prompt`'s head and tail (a plain `str` prompt counts one token)
    plus the longest answer: `answers` if given (a classification task's label set:
    rank scoring puts every label after every prompt), else each example's own.
    """
    fixed: dict[tuple[str, str], int] = {}
    longest = 0
    if answers is not None:
        longest = max(len(answer_ids(tokenizer, a, add_eos)) for a in answers)
    need = 0
    for ex in examples:
        p = ex.prompt
        if isinstance(p, Prompt):
            key = (p.head, p.tail)
            if key not in fixed:
                fixed[key] = fixed_length(tokenizer, p)
            head = fixed[key]
        else:
            head = 1
        answer = longest if answers is not None else len(answer_ids(tokenizer, ex.answer,
                                                                     add_eos))
        need = max(need, head + answer)
    return need


def encode(
    examples: Sequence[Example], tokenizer, max_length: int, add_eos: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Tokenize examples into unpadded 1-D `input_ids`, `attention_mask`, `labels`.

    Args:
        examples: Prompt/answer pairs.
        tokenizer: A HF tokenizer.
        max_length: Token limit of prompt + answer (>= 2).
        add_eos: Append the EOS token to the answer (and to its labels), so a
            trained model learns to stop.

    Returns:
        One dict per example (see the module docstring for the layout).

    Raises:
        ValueError: If an example's answer, or its answer and fixed prompt parts, do
            not fit (`required_length` finds the length a task needs up front).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    return [encode_one(ex, tokenizer, max_length, add_eos)[0] for ex in examples]


def pad_id(tokenizer) -> int:
    """The id `collate` pads with: the tokenizer's pad token, else its EOS token.

    Raises:
        ValueError: If the tokenizer has neither.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def collate(encoded: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into one batch: ids `pad_id`, mask 0, labels -100."""
    if not encoded:
        raise ValueError("collate needs at least one example")
    width = max(int(e["input_ids"].numel()) for e in encoded)
    pad_value = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    batch = {}
    for key, value in pad_value.items():
        rows = [torch.nn.functional.pad(e[key], (0, width - e[key].numel()), value=value)
                for e in encoded]
        batch[key] = torch.stack(rows)
    return batch


def filler(example: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `example` whose labels are all -100: it adds no loss and no gradient."""
    return {**example, "labels": torch.full_like(example["labels"], IGNORE)}


def batches(
    encoded: Sequence[Mapping[str, torch.Tensor]],
    batch_size: int,
    rank: int,
    world_size: int,
    last: Literal["drop", "repeat", "pad"] = "drop",
) -> Iterator[list[Mapping[str, torch.Tensor]]]:
    """This rank's contiguous share of each global batch of `batch_size * world_size`.

    Global batch `b` is `encoded[b * G : (b + 1) * G]` with `G = batch_size *
    world_size`; rank `r` gets its items `[r * batch_size, (r + 1) * batch_size)`.
    So the global order depends only on the data, never on the world size.

    Args:
        encoded: Encoded examples (`encode`).
        batch_size: Examples per rank per batch.
        rank: This rank.
        world_size: Number of data-parallel ranks.
        last: What to do with an incomplete last global batch: "drop" it;
            "repeat" examples from the start of the data to fill it (each example is
            seen at least once, a few twice); or "pad" it with `filler` copies that
            carry no loss, which makes sums over examples (scores, eval totals)
            independent of the world size.

    Yields:
        Lists of `batch_size` encoded examples (collate them per micro-batch).
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                         f"{batch_size}, {rank}, {world_size}")
    if last not in ("drop", "repeat", "pad"):
        raise ValueError(f"last must be 'drop', 'repeat' or 'pad', got {last!r}")
    num = len(encoded)
    global_size = batch_size * world_size
    num_batches = num // global_size if last == "drop" else -(-num // global_size)
    for b in range(num_batches):
        lo = b * global_size + rank * batch_size
        share = []
        for i in range(lo, lo + batch_size):
            if i < num:
                share.append(encoded[i])
            elif last == "repeat":
                share.append(encoded[i % num])
            else:
                share.append(filler(encoded[i % num]))
        yield share


def data_hash(encoded: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 of the token ids and labels of `encoded`, in order (the data's identity)."""
    h = hashlib.sha256()
    for e in encoded:
        for key in ("input_ids", "labels"):
            ids = e[key].to(torch.int64).numpy().astype("<i8", copy=False)
            h.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return h.hexdigest()
