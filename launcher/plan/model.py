"""What the planner knows about a model: its parameters, their shapes and roles.

Built from the config alone: the model is instantiated on the meta device (no
weights, no host memory), then described as a list of `ParamInfo`. A spec's
`model.name_or_path` may be

- a name of a config shipped in `launcher/plan/configs/` (`llama-2-7b-hf`,
  `mistral-7b-v0.1`, `bloom-7b1`, and the built-ins `tiny-random-llama`,
  `smollm2-135m-instruct`), or the hub id of one of them
  (`meta-llama/Llama-2-7b-hf`), so the 7B examples plan offline;
- a local directory holding a `config.json`;
- a built-in name whose converted cache entry exists (its own config is used);
- any other hub id, which `AutoConfig` may fetch when the network allows.

The built-ins' shipped configs are checked against what `launcher.run.models` builds
(tests/launcher/plan/test_model.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launcher.engines.common import decoder_layers
from launcher.engines.frozen import matmul_weights
from launcher.errors import UserError
from launcher.run.models import BUILTIN, cache_root
from ncft.arch import get_adapter

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Hub ids whose config ships here (public config.json values, no weights).
HUB_IDS = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b-hf",
    "mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1",
    "bigscience/bloom-7b1": "bloom-7b1",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct",
}


@dataclass(frozen=True)
class ParamInfo:
    """One parameter, as the engines see it.

    Attributes:
        fqn: Name in the unwrapped model.
        shape: Full storage shape.
        trainable: Whether it gets gradients and optimizer state (docs/architecture.md §3, rule 5).
        selected: Fraction of its elements a mask leaves trainable, or None when no
            mask covers it (full fine-tuning, LoRA, frozen parameters).
        module: Name of the module that owns it (FSDP1 wraps by module).
        axis: Storage axis the selection indexes (rows 0, columns 1), when masked.
        matmul: Only matrix products read it (a Linear/Conv1D weight, untied): what
            the single engine stores in the compute dtype when frozen
            (`launcher.engines.frozen.matmul_weights`).
    """

    fqn: str
    shape: tuple[int, ...]
    trainable: bool = True
    selected: float | None = None
    module: str = ""
    axis: int = 0
    matmul: bool = False

    @property
    def numel(self) -> int:
        """Number of elements."""
        out = 1
        for dim in self.shape:
            out *= dim
        return out


@dataclass(frozen=True)
class ModelInfo:
    """Shapes the planner's arithmetic needs.

    Attributes:
        source: Where the config came from (shipped name, directory or hub id).
        model_type: The config's `model_type`.
        params: Every parameter, in model order (tied weights once).
        layers: Module names of the decoder layers, in order.
        hidden: Hidden size h.
        ffn: FFN width d_ff.
        kv_width: Width of the key (and value) projection output.
        vocab: Vocabulary size V.
        gated: True for gate/up/down MLPs (Llama, Mistral), False for plain ones (Bloom).
        fused_attention: True if the model runs SDPA (no s x s score tensor is kept).
        heads: Attention heads.
    """

    source: str
    model_type: str
    params: tuple[ParamInfo, ...]
    layers: tuple[str, ...]
    hidden: int
    ffn: int
    kv_width: int
    vocab: int
    gated: bool
    fused_attention: bool
    heads: int

    @property
    def numel(self) -> int:
        """Total number of parameter elements."""
        return sum(p.numel for p in self.params)


def shipped_configs() -> list[str]:
    """Names of the configs in `launcher/plan/configs/`."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if (p / "config.json").is_file())


def resolve_config(name_or_path: str) -> tuple[Any, str]:
    """The HF config for a spec's `model.name_or_path`, and where it came from.

    Raises:
        UserError: If nothing provides a config for the name (names the field).
    """
    from transformers import AutoConfig


    name = HUB_IDS.get(name_or_path, name_or_path)
    local = Path(name_or_path).expanduser()
    if (local / "config.json").is_file():
        return AutoConfig.from_pretrained(local), str(local)
    if name in BUILTIN and (cache_root() / name / "config.json").is_file():
        return AutoConfig.from_pretrained(cache_root() / name), f"{name} (converted cache)"
    if (CONFIG_DIR / name / "config.json").is_file():
        return AutoConfig.from_pretrained(CONFIG_DIR / name), f"{name} (shipped config)"
    try:
        return AutoConfig.from_pretrained(name_or_path), name_or_path
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.name_or_path: no config for {name_or_path!r} ({err.__class__.__name__}); "
            f"give a directory with config.json or one of {shipped_configs()}"
        ) from None


def meta_model(config: Any):
    """The causal LM built from `config` on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def describe(model: Any, source: str) -> ModelInfo:
    """A `ModelInfo` of an (unwrapped, possibly meta) HF causal LM, all trainable."""
    owners: dict[int, str] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), name)  # a tied weight belongs to its first owner
    products = matmul_weights(model)
    params = tuple(
        ParamInfo(fqn=n, shape=tuple(p.shape), module=owners[id(p)], matmul=n in products)
        for n, p in model.named_parameters()
    )
    ids = {id(m) for m in decoder_layers(model)}
    layers = tuple(n for n, m in model.named_modules() if id(m) in ids)
    blocks = get_adapter(model).mlp_blocks(model)
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return ModelInfo(
        source=source, model_type=cfg.model_type, params=params, layers=layers,
        hidden=cfg.hidden_size, ffn=blocks[0].d_ff, kv_width=kv_heads * head_dim,
        vocab=cfg.vocab_size, gated=any(p.role == "gate" for p in blocks[0].projections),
        fused_attention=bool(getattr(model, "_supports_sdpa", False)), heads=heads,
    )


def with_trainable(
    info: ModelInfo, selected: dict[str, tuple[float, int]] | None, fsdp1_units: bool = False
) -> ModelInfo:
    """Mark what a stage trains.

    Args:
        info: The model, every parameter trainable and unmasked.
        selected: `fqn -> (fraction of elements selected, selected axis)` for a masked
            (neuron) stage; parameters not named are frozen. None: every parameter trains, unmasked.
        fsdp1_units: FSDP1 cannot mix trainable and frozen parameters in one flat
            parameter, so the engine trains every parameter of a module that owns a
            selected one and masks freeze the rest (`launcher/engines/fsdp1.py`).

    Returns:
        A copy with `trainable` and `selected` set.
    """
    if selected is None:
        return info
    owners = {p.module for p in info.params if p.fqn in selected}
    params = []
    for p in info.params:
        if p.fqn in selected:
            fraction, axis = selected[p.fqn]
            params.append(replace(p, trainable=True, selected=fraction, axis=axis))
        elif fsdp1_units and p.module in owners:
            params.append(replace(p, trainable=True, selected=0.0))
        else:
            params.append(replace(p, trainable=False, selected=None))
    return replace(info, params=tuple(params))


def with_params(info: ModelInfo, params: Sequence[ParamInfo]) -> ModelInfo:
    """A copy of `info` with another parameter list (LoRA adds adapters)."""
    return replace(info, params=tuple(params))
