"""Greedy generation on any engine, identical on every rank, and O-LoRA's exact match.

Each rank decodes a contiguous share of the prompts (`ncft.engine.share`); the new
tokens are gathered with one all-reduce. Sharded engines gather parameters inside
`forward`, so every rank runs a forward while ANY rank still decodes: ranks with a
smaller share decode a dummy batch whose output is thrown away, and the early exit is
itself a collective (`_any_rank_running`).

Two decoders give the same tokens: `_greedy_batch` re-runs the whole sequence each step
(the reference), `_greedy_batch_cached` feeds one token per row with the model's KV
cache (the default).

Shapes: B batch rows, T tokens, N prompts.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch

from ncft.data.examples import Example, pad_id
from ncft.data.prompt import prompt_ids
from ncft.engine import Engine, device_of, eval_mode, logits_of, share

PREDICTION_CHARS = 40  # a generated prediction is stored cut to this many characters
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def _decode_state(
    rows: list[list[int]],
    width: int,
    max_new_tokens: int,
    pad_id: int,
    active: bool,
    device: torch.device,
) -> tuple[torch.Tensor, ...]:
    """Start state shared by both greedy decoders.

    Returns (ids [B, width] right-padded, attention mask [B, width], lengths [B],
    done [B] (all True for a dummy batch), new tokens [B, max_new] zeros, arange [B]).
    """
    num = len(rows)
    ids_BT = torch.full((num, width), pad_id, dtype=torch.long, device=device)
    mask_BT = torch.zeros((num, width), dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        ids_BT[b, : len(row)] = torch.tensor(row, device=device)
        mask_BT[b, : len(row)] = 1
    lengths_B = torch.tensor([len(r) for r in rows], device=device)
    done_B = torch.full((num,), not active, dtype=torch.bool, device=device)
    new_BN = torch.zeros((num, max_new_tokens), dtype=torch.long, device=device)
    arange_B = torch.arange(num, device=device)
    return ids_BT, mask_BT, lengths_B, done_B, new_BN, arange_B


def _any_rank_running(engine: Engine, done_B: torch.Tensor, device: torch.device) -> bool:
    """Whether any rank still has a live row (a collective: every rank must call it)."""
    running = torch.tensor([0.0 if bool(done_B.all()) else 1.0], device=device)
    return float(engine.all_reduce_(running)[0]) != 0.0


def _greedy_batch(
    engine: Engine,
    rows: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    active: bool,
) -> torch.Tensor:
    """Greedy-decode right-padded rows; return new tokens + 1 (0 = none) [B, max_new].

    Right padding keeps positions 0..len-1 for every row, so no position ids are needed,
    and causal attention never lets a real token see the padding after it. Every rank
    runs a forward while ANY rank still decodes (`active=False` marks a dummy batch).
    """
    device = device_of(engine)
    width = max(len(r) for r in rows) + max_new_tokens
    ids_BT, mask_BT, lengths_B, done_B, new_BN, arange_B = _decode_state(
        rows, width, max_new_tokens, pad_id, active, device)
    for step in range(max_new_tokens):
        if not _any_rank_running(engine, done_B, device):
            break
        w = int(lengths_B.max())
        output = engine.forward({"input_ids": ids_BT[:, :w], "attention_mask": mask_BT[:, :w],
                                 "use_cache": False})
        next_B = logits_of(output)[arange_B, lengths_B - 1].argmax(-1)
        if eos_id is not None:
            stop_B = ~done_B & (next_B == eos_id)
            done_B |= stop_B
        live_B = ~done_B
        new_BN[live_B, step] = next_B[live_B] + 1
        ids_BT[arange_B[live_B], lengths_B[live_B]] = next_B[live_B]
        mask_BT[arange_B[live_B], lengths_B[live_B]] = 1
        lengths_B = lengths_B + live_B.long()
    return new_BN


def _greedy_batch_cached(
    engine: Engine,
    rows: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    active: bool,
) -> torch.Tensor:
    """`_greedy_batch` with the model's KV cache: one new token per row per forward.

    The prompt is prefilled right-padded, as `_greedy_batch` runs it. Every later step
    appends one cache slot to every row: a live row's new token, with its own position
    id (its length so far); a stopped row's padding, masked out. The padding between a
    short prompt and its first generated token stays in the cache, masked, so each row
    attends to exactly the tokens `_greedy_batch` would show it, at the same
    positions. Same forward count and early exit as `_greedy_batch`.
    """
    device = device_of(engine)
    width = max(len(r) for r in rows)
    ids_BT, mask_BT, lengths_B, done_B, new_BN, arange_B = _decode_state(
        rows, width, max_new_tokens, pad_id, active, device)
    batch: dict[str, Any] = {"input_ids": ids_BT, "attention_mask": mask_BT, "use_cache": True}
    for step in range(max_new_tokens):
        if not _any_rank_running(engine, done_B, device):
            break
        output = engine.forward(batch)
        logits_BTV = logits_of(output)
        # Prefill: each row's last prompt token; later: the one token fed.
        last_B = lengths_B - 1 if step == 0 else torch.zeros_like(lengths_B)
        next_B = logits_BTV[arange_B, last_B].argmax(-1)
        if eos_id is not None:
            done_B |= ~done_B & (next_B == eos_id)
        live_B = ~done_B
        new_BN[live_B, step] = next_B[live_B] + 1
        mask_BT = torch.cat([mask_BT, live_B.long().unsqueeze(1)], dim=1)
        batch = {"input_ids": torch.where(live_B, next_B, pad_id).unsqueeze(1),
                 "attention_mask": mask_BT, "position_ids": lengths_B.unsqueeze(1),
                 "past_key_values": output.past_key_values, "use_cache": True}
        lengths_B = lengths_B + live_B.long()
    return new_BN


def generate_greedy(
    engine: Engine,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    max_prompt_length: int | None = None,
    use_cache: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts`, decoded, identical on every rank.

    With `use_cache` each step feeds one token per row and reuses the model's KV cache
    (`_greedy_batch_cached`); without it, each step re-runs the whole sequence (the
    reference path, quadratic in the output length). A row stops at EOS (not included
    in the text); the batch stops when all rows on all ranks have stopped, or after
    `max_new_tokens`.

    Args:
        engine: The model (runs under `no_grad`, in eval mode).
        tokenizer: The HF tokenizer used for training.
        prompts: Prompt texts, tokenized as `encode` tokenizes prompts.
        max_new_tokens: Generation length limit.
        batch_size: Prompts per forward on each rank.
        max_prompt_length: Token limit of a prompt; longer prompts are cut from the
            left (BOS kept), as `encode` cuts them. None: no limit.
        use_cache: Decode with the model's KV cache (same tokens, linear cost).

    Returns:
        One stripped string per prompt, in order (every rank gets all of them).
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got "
                         f"{max_new_tokens}, {batch_size}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    limit = max_prompt_length
    span = share(len(prompts), engine.rank, engine.world_size)
    mine = [prompt_ids(tokenizer, prompts[i], limit) for i in span]
    dummy = [prompt_ids(tokenizer, prompts[0], limit)]
    largest = -(-len(prompts) // engine.world_size)
    num_batches = -(-largest // batch_size)
    device, pad = device_of(engine), pad_id(tokenizer)
    # Each rank writes its own rows into a zero tensor; summing over ranks gathers them
    # (the Engine protocol offers all-reduce only).
    new_NT = torch.zeros((len(prompts), max_new_tokens), dtype=torch.long, device=device)
    decode = _greedy_batch_cached if use_cache else _greedy_batch
    with torch.no_grad(), eval_mode(engine.module):
        for b in range(num_batches):
            rows = mine[b * batch_size : (b + 1) * batch_size]
            out = decode(engine, rows or dummy, max_new_tokens, pad,
                         tokenizer.eos_token_id, active=bool(rows))
            if rows:
                lo = span.start + b * batch_size
                new_NT[lo : lo + len(rows)] = out
    engine.all_reduce_(new_NT)
    texts = []
    for row in new_NT.cpu():
        ids = (row[row > 0] - 1).tolist()
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def normalize_answer(text: str) -> str:
    """Lower case, ASCII punctuation removed, whitespace runs collapsed to one space.

    O-LoRA's exact match (`src/compute_metrics.py`, taken from Super-NaturalInstructions:
    SQuAD v1.1's normalisation without removing articles).
    """
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def label_set_share(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Share of predictions that are one of `labels` (after `normalize_answer`).

    A generate-mode prediction outside the task's own label set is an answer the model
    took from elsewhere, e.g. a later task's label (the "takeover" the forgetting
    diagnosis found). Rank-mode predictions are labels by construction (share 1).
    """
    if not predictions:
        raise ValueError("label_set_share needs at least one prediction")
    known = {normalize_answer(label) for label in labels}
    return sum(normalize_answer(p) in known for p in predictions) / len(predictions)


def generated_records(
    engine: Engine, tokenizer, examples: Sequence[Example], max_new_tokens: int,
    batch_size: int, max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """Greedy-decode each prompt and compare it with its label (`normalize_answer`).

    Args:
        engine: The model.
        tokenizer: The HF tokenizer used for training.
        examples: Examples whose `answer` is the gold label.
        max_new_tokens: Generation length limit.
        batch_size: Prompts per forward on each rank.
        max_prompt_length: Token limit of a prompt (see `generate_greedy`).

    Returns:
        `{"accuracy", "predictions", "correct"}`, the same on every rank: the fraction of
        exact matches, each normalised text (cut to `PREDICTION_CHARS` characters) and
        each 0/1 outcome.
    """
    texts = generate_greedy(engine, tokenizer, [ex.prompt for ex in examples], max_new_tokens,
                            batch_size, max_prompt_length)
    said = [normalize_answer(t) for t in texts]
    correct = [int(s == normalize_answer(ex.answer)) for s, ex in zip(said, examples)]
    return {"accuracy": sum(correct) / len(correct),
            "predictions": [s[:PREDICTION_CHARS] for s in said], "correct": correct}
