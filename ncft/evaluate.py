"""Task evaluation on any engine: constrained classification, greedy generation, scores.

Every function here runs on every rank and returns the same number everywhere. Each
rank evaluates a contiguous share of the examples (`np.array_split` style: shares
differ by at most one), and totals are summed with `engine.all_reduce_`.

Sharded engines (ZeRO-3, FSDP) gather parameters inside `forward`, so a forward is a
collective: every rank must call it the same number of times. Ranks with a smaller
share therefore run dummy forwards (on a copy of the first example) whose outputs are
thrown away; the number of forwards is computed from the data sizes alone, never from
what a rank happens to hold.

Classification is scored one of two ways (`eval.classification`): `rank` (the label
whose tokens get the highest summed log-probability wins, `classification_accuracy`)
or `generate` (greedy decoding, then exact match after O-LoRA's normalisation,
`generated_accuracy`: the protocol of O-LoRA and of the papers' tables).

Scores are all in [0, 1]: accuracy, ROUGE-L F-measure, and BLEU divided by 100 (so
one task score can sit next to another in the accuracy matrix and retention ratios
mean the same for every task). The task score (`task_score`) is the accuracy for
classification and the FIRST listed metric for generation.

Shapes: B batch rows, T tokens, V vocabulary, K labels.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ncft.data.examples import IGNORE, Example, collate, encode
from ncft.engine import Engine, device_of, eval_mode

METRICS = ("bleu", "rougeL")
CLASSIFICATION = ("rank", "generate")
_PREDICTION_CHARS = 40  # a generated prediction is stored cut to this many characters
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def share(num: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of `num` items; shares differ by at most one."""
    return range(rank * num // world_size, (rank + 1) * num // world_size)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


# --- classification ----------------------------------------------------------------------


def _answer_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens, float64 [B]."""
    # Logits at t predict token t + 1 (the shift causal-LM losses use).
    labels_BT = labels_BT[:, 1:]
    mask_BT = labels_BT != IGNORE
    # log_softmax only at answer positions: at 7B vocabularies the full [B, T, V]
    # float32 copy would dwarf the model's activations.
    picked_MV = logits_BTV[:, :-1][mask_BT].float().log_softmax(-1)
    token_lp_M = picked_MV.gather(1, labels_BT[mask_BT].unsqueeze(1)).squeeze(1)
    rows_M = torch.arange(labels_BT.shape[0], device=labels_BT.device)
    rows_M = rows_M.unsqueeze(1).expand_as(mask_BT)[mask_BT]
    out_B = torch.zeros(labels_BT.shape[0], dtype=torch.float64, device=labels_BT.device)
    return out_B.index_add_(0, rows_M, token_lp_M.double())


def label_scores(
    engine: Engine,
    tokenizer,
    examples: Sequence[Example],
    labels: Sequence[str],
    batch_size: int,
    max_length: int,
    add_eos: bool = True,
) -> torch.Tensor:
    """Each label's summed log-probability for each example, float64 [N, K] on the host.

    Each (example, label) pair is encoded exactly as training encodes an answer
    (`ncft.data.examples.encode`), and scored by the summed log-probability of the
    label's tokens given the prompt. With `add_eos` (the training default) the EOS
    token after the label is scored too, so a label that is a prefix of another
    ("positive" vs "positive review") is still told apart. Every rank scores its share
    and writes it into a zero [N, K] tensor; one all-reduce gives every rank all rows
    (the scores, not only a count, so margins and per-example bootstraps can be read).

    Args:
        engine: The model to evaluate (runs under `no_grad`, in eval mode).
        tokenizer: The HF tokenizer used for training.
        examples: Examples whose `answer` is the gold label.
        labels: The label set, in a fixed order.
        batch_size: (example, label) sequences per forward on each rank.
        max_length: Token limit of prompt + label, as in training.
        add_eos: Score the EOS token after each label too.

    Raises:
        ValueError: If `examples`/`labels` are empty, labels repeat, or a gold answer is
            not in `labels`.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be a non-empty list of distinct strings, got {labels!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = {label: k for k, label in enumerate(labels)}
    for i, ex in enumerate(examples):
        if ex.answer not in index:
            raise ValueError(f"examples[{i}].answer {ex.answer!r} is not one of labels {labels}")
    span = share(len(examples), engine.rank, engine.world_size)
    mine = [examples[i] for i in span]
    pairs = encode([Example(ex.prompt, label) for ex in mine for label in labels],
                   tokenizer, max_length, add_eos)
    dummy = encode([Example(examples[0].prompt, labels[0])], tokenizer, max_length, add_eos)
    largest = -(-len(examples) // engine.world_size) * len(labels)
    num_forwards = -(-largest // batch_size)
    device, pad_id = device_of(engine), _pad_id(tokenizer)
    scores: list[torch.Tensor] = []
    with torch.no_grad(), eval_mode(engine.module):
        for b in range(num_forwards):
            chunk = pairs[b * batch_size : (b + 1) * batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk or dummy, pad_id).items()}
            output = engine.forward({"input_ids": batch["input_ids"],
                                     "attention_mask": batch["attention_mask"],
                                     "use_cache": False})
            if chunk:
                scores.append(_answer_logprobs(_logits(output), batch["labels"]))
    all_NK = torch.zeros((len(examples), len(labels)), dtype=torch.float64, device=device)
    if mine:
        all_NK[span.start : span.stop] = torch.cat(scores).view(len(mine), len(labels))
    return engine.all_reduce_(all_NK).cpu()


def classification_accuracy(
    engine: Engine,
    tokenizer,
    examples: Sequence[Example],
    labels: Sequence[str],
    batch_size: int,
    max_length: int,
    add_eos: bool = True,
) -> float:
    """Accuracy of constrained decoding: the most likely label string wins.

    Scores come from `label_scores` (same arguments). Ties go to the label listed first.

    Returns:
        Fraction of examples whose best-scoring label is the gold one, over all ranks.
    """
    scores_NK = label_scores(engine, tokenizer, examples, labels, batch_size, max_length,
                             add_eos)
    return rank_records(scores_NK, examples, labels)["accuracy"]


def rank_records(
    scores_NK: torch.Tensor, examples: Sequence[Example], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and per-example records of rank classification.

    Returns:
        `{"accuracy", "predictions" (label strings), "correct" (0/1), "margins"}`; a
        margin is the gold label's log-probability minus the best other label's (> 0:
        right with that much room; < 0: wrong by that much), rounded to 1e-4.
    """
    # argmax returns the first maximum, which is the documented tie rule.
    predicted_N = scores_NK.argmax(dim=1)
    gold_N = torch.tensor([labels.index(ex.answer) for ex in examples])
    correct_N = predicted_N == gold_N
    others_NK = scores_NK.clone()
    others_NK[torch.arange(len(examples)), gold_N] = float("-inf")
    gold_score_N = scores_NK[torch.arange(len(examples)), gold_N]
    margins = (gold_score_N - others_NK.max(dim=1).values) if len(labels) > 1 else gold_score_N
    return {"accuracy": float(correct_N.double().mean()),
            "predictions": [labels[k] for k in predicted_N.tolist()],
            "correct": correct_N.int().tolist(),
            "margins": [round(float(m), 4) for m in margins]}


# --- generation --------------------------------------------------------------------------


def _prompt_ids(tokenizer, prompt: str, limit: int | None) -> list[int]:
    """Prompt tokens as `encode` makes them, cut from the left (BOS kept) to `limit`."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if limit is None or len(ids) <= limit:
        return ids
    head = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
    return head + ids[len(ids) - (limit - len(head)) :]


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
        next_B = _logits(output)[arange_B, lengths_B - 1].argmax(-1)
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
        logits_BTV = _logits(output)
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
    mine = [_prompt_ids(tokenizer, prompts[i], limit) for i in span]
    dummy = [_prompt_ids(tokenizer, prompts[0], limit)]
    largest = -(-len(prompts) // engine.world_size)
    num_batches = -(-largest // batch_size)
    device, pad_id = device_of(engine), _pad_id(tokenizer)
    # Each rank writes its own rows into a zero tensor; summing over ranks gathers them
    # (the Engine protocol offers all-reduce only).
    new_NT = torch.zeros((len(prompts), max_new_tokens), dtype=torch.long, device=device)
    decode = _greedy_batch_cached if use_cache else _greedy_batch
    with torch.no_grad(), eval_mode(engine.module):
        for b in range(num_batches):
            rows = mine[b * batch_size : (b + 1) * batch_size]
            out = decode(engine, rows or dummy, max_new_tokens, pad_id,
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


def generated_accuracy(
    engine: Engine, tokenizer, examples: Sequence[Example], max_new_tokens: int,
    batch_size: int, max_prompt_length: int | None = None,
) -> tuple[float, list[str]]:
    """Greedy-decode each prompt and compare it with its label (`normalize_answer`).

    Returns:
        The fraction of exact matches (the same on every rank) and the decoded texts.
    """
    texts = generate_greedy(engine, tokenizer, [ex.prompt for ex in examples], max_new_tokens,
                            batch_size, max_prompt_length)
    hits = [normalize_answer(t) == normalize_answer(ex.answer) for t, ex in zip(texts, examples)]
    return sum(hits) / len(hits), texts


def text_scores(
    hypotheses: Sequence[str], references: Sequence[str], metrics: Sequence[str]
) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 13a tokenization) / 100 and mean ROUGE-L F1, in [0, 1].

    rouge-score's default tokenizer keeps only ASCII letters and digits, so ROUGE-L is
    meaningful for English targets only; use BLEU for other languages.

    Raises:
        ValueError: If `metrics` names an unknown metric or the lists differ in length.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"metrics must be a non-empty subset of {list(METRICS)}, got "
                         f"{list(metrics)}")
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (>0), got "
                         f"{len(hypotheses)} and {len(references)}")
    out: dict[str, float] = {}
    if "bleu" in metrics:
        import sacrebleu

        bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100
        out["bleu"] = min(bleu, 1.0)  # sacrebleu's exp(log) can land a hair above 100
    if "rougeL" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        f1 = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
        out["rougeL"] = sum(f1) / len(f1)
    return {m: out[m] for m in metrics}


def task_score(scores: Mapping[str, float], metrics: Sequence[str] = METRICS) -> float:
    """The one number per task the accuracy matrix stores.

    Args:
        scores: What `evaluate_task` returns (an "accuracy" key for classification).
        metrics: The generation metrics, in order; the first one is the task score.
    """
    if "accuracy" in scores:
        return float(scores["accuracy"])
    return float(scores[metrics[0]])


def evaluate_task(
    engine: Engine,
    tokenizer,
    examples: Sequence[Example],
    *,
    format: str,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] = METRICS,
    batch_size: int = 8,
    max_length: int = 256,
    max_new_tokens: int = 64,
    classification: str = "rank",
) -> dict[str, float]:
    """Evaluate one task; the result carries its metrics and `"score"` (`task_score`).

    Args:
        engine: The model.
        tokenizer: The HF tokenizer.
        examples: The task's evaluation examples.
        format: "classification" or "generation".
        labels: The label set (classification only).
        metrics: Generation metrics; the first is the task score.
        batch_size: Sequences per forward per rank.
        max_length: The task's token limit (prompt + answer); generation prompts are
            cut to `max_length - 1` tokens, as `encode` cuts them for a 1-token answer.
        max_new_tokens: Generation length limit.
        classification: "rank" (`classification_accuracy`) or "generate"
            (`generated_accuracy`; the generation length is `max_new_tokens`).

    Returns:
        `{"accuracy", "score", "predictions", "correct"}` (rank mode adds "margins",
        see `rank_records`; generate mode's predictions are the normalised texts) or
        `{<metric>..., "score", "hypotheses"}`; scores in [0, 1]. The per-example lists are what
        bootstrap intervals and per-class prediction counts are computed from.
    """
    if format == "classification":
        if not labels:
            raise ValueError("format=classification needs labels")
        if classification == "generate":
            acc, texts = generated_accuracy(engine, tokenizer, examples, max_new_tokens,
                                            batch_size, max(1, max_length - 1))
            gold = [normalize_answer(ex.answer) for ex in examples]
            said = [normalize_answer(t) for t in texts]
            scores = {"accuracy": acc, "predictions": [t[:_PREDICTION_CHARS] for t in said],
                      "correct": [int(a == b) for a, b in zip(said, gold)]}
        elif classification == "rank":
            scores = rank_records(
                label_scores(engine, tokenizer, examples, labels, batch_size, max_length),
                examples, labels)
        else:
            raise ValueError(f"eval.classification must be one of {list(CLASSIFICATION)}, "
                             f"got {classification!r}")
    elif format == "generation":
        text_scores([""], [""], metrics)  # validate the names before the expensive part
        hypotheses = generate_greedy(engine, tokenizer, [ex.prompt for ex in examples],
                                     max_new_tokens, batch_size, max(1, max_length - 1))
        scores = {**text_scores(hypotheses, [ex.answer for ex in examples], metrics),
                  "hypotheses": hypotheses}
    else:
        raise ValueError(f"format must be 'classification' or 'generation', got {format!r}")
    return {**scores, "score": task_score(scores, metrics)}
