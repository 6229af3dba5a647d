"""Task evaluation on any engine: constrained classification, generation scores.

Every function here runs on every rank and returns the same number everywhere. Each
rank evaluates a contiguous share of the examples (`ncft.engine.share`: shares differ
by at most one), and results are summed with `engine.all_reduce_`.

Sharded engines (ZeRO-3, FSDP) gather parameters inside `forward`, so a forward is a
collective: every rank must call it the same number of times. Ranks with a smaller
share therefore run dummy forwards (on a copy of the first example) whose outputs are
thrown away; the number of forwards is computed from the data sizes alone, never from
what a rank happens to hold.

Classification is scored one of two ways (`eval.classification`): `rank` (the label
whose tokens get the highest summed log-probability wins, `label_scores` and
`rank_records`) or `generate` (greedy decoding, then exact match after O-LoRA's
normalisation, `ncft.generation.generated_records`: the protocol of O-LoRA and of the
papers' tables).

Scores are all in [0, 1]: accuracy, ROUGE-L F-measure, and BLEU divided by 100 (so
one task score can sit next to another in the accuracy matrix and retention ratios
mean the same for every task). The task score (`task_score`) is the accuracy for
classification and the FIRST listed metric for generation.

Shapes: B batch rows, T tokens, V vocabulary, K labels.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ncft.data.examples import IGNORE, Example, collate, encode, pad_id
from ncft.engine import Engine, device_of, eval_mode, logits_of, share
from ncft.generation import generate_greedy, generated_records

METRICS = ("bleu", "rougeL")
CLASSIFICATION = ("rank", "generate")
# Content-free inputs of Zhao et al. 2021 ("Calibrate Before Use", ICML, §4): a task's
# template filled with each of these shows the model's label prior without content.
CONTENT_FREE = ("N/A", "", "[MASK]")


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


def _shared_prefix(pairs: Sequence[Mapping[str, torch.Tensor]]) -> int:
    """How many leading tokens all of one example's K encoded label rows share.

    The prefix stops at the first answer token (or earlier, where the rows first
    differ), so every scored token lies after it. `label_scores` gives every label the
    same prompt budget, so the prefix is normally the whole prompt.

    Raises:
        ValueError: If the rows share no first token (an empty prompt without BOS).
    """
    ids = [p["input_ids"] for p in pairs]
    width = min(int(i.numel()) for i in ids)
    same = torch.stack([i[:width] for i in ids]).eq(ids[0][:width]).all(dim=0)
    common = int(same.long().cumprod(0).sum())
    prompt = min(int((p["labels"] == IGNORE).sum()) for p in pairs)
    # A row's token 0 is never scored (nothing predicts it), so it may join the prefix.
    length = max(min(common, prompt), min(common, 1))
    if length < 1:
        raise ValueError("a prompt encodes to no tokens and the labels share no first "
                         "token: there is no prefix to score the labels from")
    return length


def _cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A copy of a HF KV cache holding batch rows `rows` (repeats allowed).

    Layers are copied shallowly and their key/value tensors re-indexed, so the
    caller's cache is untouched when the model appends the label tokens to the copy.
    """
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.batch_select_indices(rows)
    return out


def _group_scores(
    engine: Engine, group: Sequence[Sequence[Mapping[str, torch.Tensor]]], pad: int,
    device: torch.device,
) -> torch.Tensor:
    """Scores of one group of examples' label rows: two forwards, float64 [G * K].

    Prefill: each example's shared prefix (`_shared_prefix`), right-padded, with the
    KV cache on. Labels: every (example, label) row's remaining tokens in one forward
    over a copy of the cache with each prefix repeated K times; the position ids
    continue each prefix and the prefix padding stays masked, so each row sees exactly
    the tokens the full sequence would show it, at the same positions. The first
    remaining token is scored from the prefill's last logit, the rest from the label
    forward.
    """
    starts = [_shared_prefix(pairs) for pairs in group]
    prefill = collate([{"input_ids": pairs[0]["input_ids"][:n],
                        "attention_mask": torch.ones(n, dtype=torch.long),
                        "labels": torch.full((n,), IGNORE)}
                       for pairs, n in zip(group, starts)], pad)
    # Only each prefix's last position is scored: HF's `logits_to_keep` (these
    # positions, shared by all rows) skips the LM head elsewhere, which at a 49k
    # vocabulary costs as much as a 135M model's layers.
    keep_U = torch.tensor(sorted({n - 1 for n in starts}), device=device)
    out = engine.forward({"input_ids": prefill["input_ids"].to(device),
                          "attention_mask": prefill["attention_mask"].to(device),
                          "logits_to_keep": keep_U, "use_cache": True})
    num_labels = len(group[0])
    rows_R = torch.arange(len(group), device=device).repeat_interleave(num_labels)
    starts_R = torch.tensor(starts, device=device).repeat_interleave(num_labels)
    last_RV = logits_of(out)[rows_R, torch.searchsorted(keep_U, starts_R - 1)]
    rest = collate([{k: pair[k][n:] for k in ("input_ids", "attention_mask", "labels")}
                    for pairs, n in zip(group, starts) for pair in pairs], pad)
    rest = {k: v.to(device) for k, v in rest.items()}
    mask_RT = torch.cat([prefill["attention_mask"].to(device)[rows_R],
                         rest["attention_mask"]], dim=1)
    width = rest["input_ids"].shape[1]
    positions_RL = starts_R.unsqueeze(1) + torch.arange(width, device=device)
    tail = engine.forward({"input_ids": rest["input_ids"], "attention_mask": mask_RT,
                           "position_ids": positions_RL,
                           "past_key_values": _cache_rows(out.past_key_values, rows_R),
                           "use_cache": True})
    # Column 0 of the joined logits predicts the first remaining token (label column 1).
    logits_RLV = torch.cat([last_RV.unsqueeze(1), logits_of(tail)], dim=1)
    labels_RL = torch.cat([torch.full_like(rest["labels"][:, :1], IGNORE), rest["labels"]], 1)
    return _answer_logprobs(logits_RLV, labels_RL)


def _label_limits(
    tokenizer, prompt: str, labels: Sequence[str], max_length: int, add_eos: bool
) -> list[int]:
    """Each label's token limit such that every label leaves the prompt the same room.

    `encode` fits the prompt into `max_length` minus the answer's tokens; giving label
    k the limit `max_length - (longest answer - answer k)` leaves every label the room
    the longest one leaves, so one example's label rows share their whole prompt (cut,
    if at all, as for the longest label) and it is encoded and run once.
    """
    answers = [int((encode([Example(prompt, label)], tokenizer, max_length, add_eos)[0]
                    ["labels"] != IGNORE).sum()) for label in labels]
    return [max_length - (max(answers) - n) for n in answers]


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

    The prompt is encoded once per example, not once per label: a group of
    `batch_size` examples costs two forwards (`_group_scores`): their prompts with the
    KV cache on, then all K label continuations at once over K copies of that cache.
    The scores equal scoring each full (prompt, label) sequence on its own up to float
    rounding (|difference| < 1e-4 nats in fp32; tests/ncft/test_evaluate.py and
    test_evaluate_dist.py). Every label is scored on the same prompt: one that does not
    fit `max_length` with the longest label is cut as for that label
    (`_label_limits`), for the shorter labels too. The label forward holds the group's
    prompt cache K times: lower the evaluation batch size if it runs out of memory.

    Args:
        engine: The model to evaluate (runs under `no_grad`, in eval mode).
        tokenizer: The HF tokenizer used for training.
        examples: Examples whose `answer` is the gold label.
        labels: The label set, in a fixed order.
        batch_size: Examples per prefill forward on each rank (the label forward
            carries `batch_size * K` short rows).
        max_length: Token limit of prompt + longest label, as in training.
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
    # Every rank runs the forwards of the largest share (a forward is a collective on
    # sharded engines); a smaller share is topped up with copies of example 0 whose
    # scores are dropped.
    largest = -(-len(examples) // engine.world_size)
    mine = [examples[i] for i in span] + [examples[0]] * (largest - len(span))
    limits = _label_limits(tokenizer, examples[0].prompt, labels, max_length, add_eos)
    device, pad = device_of(engine), pad_id(tokenizer)
    scores: list[torch.Tensor] = []
    with torch.no_grad(), eval_mode(engine.module):
        for b in range(0, largest, batch_size):
            chunk = mine[b : b + batch_size]
            group = [[encode([Example(ex.prompt, label)], tokenizer, limit, add_eos)[0]
                      for label, limit in zip(labels, limits)] for ex in chunk]
            scores.append(_group_scores(engine, group, pad, device))
    all_NK = torch.zeros((len(examples), len(labels)), dtype=torch.float64, device=device)
    if len(span):
        all_NK[span.start : span.stop] = torch.cat(scores).view(largest, len(labels))[: len(span)]
    return engine.all_reduce_(all_NK).cpu()


def label_prior(
    engine: Engine, tokenizer, prompts: Sequence[str], labels: Sequence[str],
    batch_size: int, max_length: int,
) -> torch.Tensor:
    """The model's log prior over `labels` on content-free `prompts`, float64 [K].

    Each prompt's label scores (`label_scores`) are normalised over the labels, the
    probabilities averaged over the prompts, and the log taken: Zhao et al. 2021's
    `p_cf`. Subtracting it from every example's label scores divides each label's
    probability by its prior (their `W = diag(p_cf)^-1`, `b = 0`). A collective, like
    `label_scores`; every rank passes the same prompts.
    """
    if not prompts:
        raise ValueError("content-free calibration needs at least one prompt")
    cf = [Example(prompt, labels[0]) for prompt in prompts]
    scores_PK = label_scores(engine, tokenizer, cf, labels, batch_size, max_length)
    return scores_PK.softmax(dim=1).mean(dim=0).log()


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
    calibration_prompts: Sequence[str] = (),
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
        classification: "rank" (`label_scores`, `rank_records`) or "generate"
            (`generated_records`; the generation length is `max_new_tokens`).
        calibration_prompts: Rank mode only: content-free prompts (the task's template
            filled with `CONTENT_FREE`); if given, each label's score is divided by the
            model's prior on them (`label_prior`) before the best label is taken, and
            the result carries `"label_prior"` (log, per label).

    Returns:
        `{"accuracy", "score", "predictions", "correct"}` (rank mode adds "margins",
        see `rank_records`; generate mode's predictions are the normalised texts) or
        `{<metric>..., "score", "hypotheses"}`; scores in [0, 1]. The per-example lists are what
        bootstrap intervals and per-class prediction counts are computed from.
    """
    if format == "classification":
        if not labels:
            raise ValueError("format=classification needs labels")
        if calibration_prompts and classification != "rank":
            raise ValueError("eval.calibration needs eval.classification: rank (generated "
                             "text has no label scores to calibrate)")
        if classification == "generate":
            scores = generated_records(engine, tokenizer, examples, max_new_tokens,
                                       batch_size, max(1, max_length - 1))
        elif classification == "rank":
            scores_NK = label_scores(engine, tokenizer, examples, labels, batch_size, max_length)
            prior_K = None
            if calibration_prompts:
                prior_K = label_prior(engine, tokenizer, calibration_prompts, labels,
                                      batch_size, max_length)
                raw = rank_records(scores_NK, examples, labels)
                scores_NK = scores_NK - prior_K
            scores = rank_records(scores_NK, examples, labels)
            if prior_K is not None:
                scores["label_prior"] = [round(float(v), 6) for v in prior_K]
                # The uncalibrated read-out of the same forward passes, kept apart.
                scores["raw"] = {k: raw[k] for k in ("accuracy", "predictions", "correct")}
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
