"""One launched job: KV-cache generation and shared-prefix label scores, sharded.

Run under torchrun by tests/ncft/test_evaluate_dist.py. Per backend, the
position-sensitive tiny Llama (tests/support/review_lm.py `sharp_model`) generates
for prompts of mixed lengths, cached and uncached; each rank records the token texts
and how many forwards it ran (every rank must run the same number under sharding).
Then it scores `SHARED` labels for the same prompts with `label_scores` (shared
prompt prefix, KV cache) at a full and at a cutting `max_length`.
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.engines import OptimConfig, build_engine
from ncft.data.examples import Example
from ncft.evaluate import label_scores
from ncft.generation import generate_greedy
from tests.support.review_lm import MIXED, SHARED, WORDS, sharp_model
from tests.support.spawn import backends_main
from tests.support.tiny import word_tokenizer


def run_backend(backend: str, info, out: Path) -> None:
    tok = word_tokenizer(WORDS)
    engine = build_engine(backend, sharp_model(), OptimConfig(), info)
    forward = engine.forward
    report = {}
    for use_cache in (True, False):
        calls = []
        engine.forward = lambda batch, calls=calls: (calls.append(1), forward(batch))[1]
        texts = generate_greedy(engine, tok, MIXED, 12, 2, use_cache=use_cache)
        report[f"cache{int(use_cache)}"] = {"texts": texts, "forwards": len(calls)}
    calls = []
    engine.forward = lambda batch: (calls.append(1), forward(batch))[1]
    examples = [Example(p, SHARED[i % len(SHARED)]) for i, p in enumerate(MIXED)]
    for max_length in (64, 9):
        scores = label_scores(engine, tok, examples, SHARED, 3, max_length)
        report[f"labels{max_length}"] = scores.tolist()
    report["label_forwards"] = len(calls)
    engine.forward = forward
    (out / f"{backend}_ws{info.world_size}_rank{info.rank}.json").write_text(json.dumps(report))
    engine.close()


if __name__ == "__main__":
    backends_main(run_backend)
