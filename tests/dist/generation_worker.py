"""One launched job: greedy generation with and without the KV cache, sharded.

Run under torchrun by tests/ncft/test_evaluate_dist.py. Per backend, the
position-sensitive tiny Llama (tests/support/review_lm.py `sharp_model`) generates
for prompts of mixed lengths, cached and uncached; each rank records the token texts
and how many forwards it ran (every rank must run the same number under sharding).
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.engines import OptimConfig, build_engine
from ncft.generation import generate_greedy
from tests.support.review_lm import MIXED, WORDS, sharp_model
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
    engine.forward = forward
    (out / f"{backend}_ws{info.world_size}_rank{info.rank}.json").write_text(json.dumps(report))
    engine.close()


if __name__ == "__main__":
    backends_main(run_backend)
