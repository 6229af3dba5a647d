"""W-NCFT with `wncft.query: example`: every input routed by its own representation.

Leng & Xiong (App. A.2) query the task store with the evaluated TASK's vector, so the
mixture is chosen with the task identity in hand (their "static" weighting). With
`example`, each evaluation example is routed on its own, with no task identity:

1. First pass, on the current model before any mixing: the example's vector is the
   mean last-layer hidden state over its prompt tokens (`wncft.example_vectors`, the
   statistic a task vector averages over many prompts).
2. Its weights are `softmax(cos(q_n, v_i) / T)` over the captured tasks, with the same
   temperature as the task query (`wncft.mixing_weights`).
3. The example is evaluated with its own mixture written into the model. Examples whose
   weight vectors are bit-identical share one mixture and one evaluation pass; in
   general every example has its own (exact per-example mixing, no bucketing).

Cost against `task`: one extra forward per example for its vector (every rank computes
all of them, so no gather is needed), and one `apply_mixture`/`restore` (a write of
the selected slices, O(selected elements)) plus one evaluation call per distinct weight
vector, which runs batches of one example: roughly `eval.batch_size` times the
evaluation forwards of `task` for classification. Scores combine exactly: accuracy as
the example-weighted mean of the groups' accuracies, generation metrics over all
hypotheses at once (corpus BLEU is not a mean of per-example BLEU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ncft.continual import wncft
from ncft.engine import Engine
from ncft.evaluate import task_score, text_scores
from ncft.generation import generate_greedy

EvalFn = Callable[[Sequence[Any]], dict[str, Any]]


def groups(weights_NK: torch.Tensor) -> list[tuple[torch.Tensor, list[int]]]:
    """Examples with bit-identical weight rows, as (weights [K], example indices)."""
    unique_GK, inverse_N = torch.unique(weights_NK, dim=0, return_inverse=True)
    return [(unique_GK[g], (inverse_N == g).nonzero().squeeze(1).tolist())
            for g in range(len(unique_GK))]


def example_weights(
    engine: Engine, tokenizer, store: wncft.TaskStore, prompts: Sequence[str],
    batch_size: int, max_length: int, temperature: float,
) -> torch.Tensor:
    """Each prompt's mixing weights over the captured tasks, float64 [N, K]."""
    batches = wncft.prompt_batches(tokenizer, prompts, batch_size, max_length, 0, 1)
    vectors_ND = wncft.example_vectors(engine, batches)
    return torch.stack([store.weights(q, temperature) for q in vectors_ND])


_PER_EXAMPLE = ("predictions", "correct", "margins")


def evaluate_routed(
    engine: Engine, store: wncft.TaskStore, examples: Sequence[Any], weights_NK: torch.Tensor,
    evaluate: EvalFn, generation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate each example under its own mixture (module docstring).

    Args:
        engine: The model; it holds its previous values again afterwards.
        store: The captured tasks.
        examples: The task's evaluation examples.
        weights_NK: `example_weights` of their prompts.
        evaluate: `examples -> evaluate_task(...)` for classification tasks.
        generation: For generation tasks, `{"tokenizer", "metrics", "max_new_tokens",
            "batch_size", "max_prompt_length"}`: hypotheses are generated per group and
            scored together.

    Returns:
        The task's scores with `"score"`, `"query": "example"`, the mean mixing weights
        over the examples, and `"top_task_share"`: the fraction of examples whose
        largest weight is each task (how often routing picks each task).
    """
    correct, texts = 0.0, [""] * len(examples)
    records: dict[str, list] = {}  # per-example lists (`evaluate_task`), in example order
    for weights_K, members in groups(weights_NK):
        subset = [examples[i] for i in members]
        with wncft.mixed(engine, store, weights_K):
            if generation is None:
                result = evaluate(subset)
                correct += result["accuracy"] * len(subset)
                for key in _PER_EXAMPLE:
                    if key in result:
                        column = records.setdefault(key, [None] * len(examples))
                        for i, value in zip(members, result[key]):
                            column[i] = value
            else:
                g = generation
                out = generate_greedy(engine, g["tokenizer"], [ex.prompt for ex in subset],
                                      g["max_new_tokens"], g["batch_size"],
                                      g["max_prompt_length"])
                for i, text in zip(members, out):
                    texts[i] = text
    if generation is None:
        scores: dict[str, Any] = {"accuracy": correct / len(examples), **records}
        metrics: Sequence[str] = ()
    else:
        metrics = generation["metrics"]
        scores = {**text_scores(texts, [ex.answer for ex in examples], metrics),
                  "hypotheses": texts}
    score = task_score(scores, metrics) if metrics else scores["accuracy"]
    top = torch.bincount(weights_NK.argmax(1), minlength=weights_NK.shape[1])
    return {**scores, "score": score, "query": "example",
            "mixing_weights": weights_NK.mean(0).tolist(),
            "top_task_share": (top.double() / len(examples)).tolist()}
