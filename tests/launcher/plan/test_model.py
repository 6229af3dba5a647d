"""Shipped configs, config resolution, and the stage a method trains."""

from __future__ import annotations

import json

import pytest

from launcher.plan.model import (
    CONFIG_DIR,
    HUB_IDS,
    describe,
    meta_model,
    resolve_config,
    shipped_configs,
)

# Published parameter counts of the three 7B models.
PUBLIC_COUNTS = {
    "llama-2-7b-hf": 6_738_415_616,
    "mistral-7b-v0.1": 7_241_732_096,
    "bloom-7b1": 7_069_016_064,
}


@pytest.mark.parametrize("name", sorted(PUBLIC_COUNTS))
def test_shipped_7b_configs_build_on_meta_with_public_counts(name):
    config, source = resolve_config(name)
    info = describe(meta_model(config), source)
    assert info.numel == PUBLIC_COUNTS[name]
    assert "shipped" in source
    assert not (CONFIG_DIR / name / "model.safetensors").exists()


def test_hub_ids_map_to_shipped_configs():
    assert set(HUB_IDS.values()) <= set(shipped_configs())
    config, source = resolve_config("meta-llama/Llama-2-7b-hf")
    assert config.intermediate_size == 11008 and "llama-2-7b-hf" in source


def test_describe_llama_and_bloom_shapes():
    llama = describe(meta_model(resolve_config("mistral-7b-v0.1")[0]), "m")
    assert (llama.hidden, llama.ffn, llama.kv_width, llama.gated) == (4096, 14336, 1024, True)
    assert llama.fused_attention and len(llama.layers) == 32
    bloom = describe(meta_model(resolve_config("bloom-7b1")[0]), "b")
    assert (bloom.ffn, bloom.gated, bloom.fused_attention) == (16384, False, False)


def test_tiny_random_llama_config_matches_the_builtin(tmp_path):
    from launcher.run.models import _build_tiny

    _build_tiny(tmp_path)
    built = json.loads((tmp_path / "config.json").read_text())
    shipped = json.loads((CONFIG_DIR / "tiny-random-llama" / "config.json").read_text())
    for key, value in shipped.items():
        if key != "architectures":
            assert built[key] == value, key


def test_local_directory_and_unknown_name(tmp_path):
    from launcher.run.models import _build_tiny

    _build_tiny(tmp_path)
    config, source = resolve_config(str(tmp_path))
    assert config.hidden_size == 32 and source == str(tmp_path)
    with pytest.raises(ValueError, match="model.name_or_path"):
        resolve_config(str(tmp_path / "nothing-here"))
