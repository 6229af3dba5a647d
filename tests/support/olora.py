"""The O-LoRA setting shared by the single-process and sharded O-LoRA tests."""

from __future__ import annotations

import torch

from ncft import olora
from ncft.continual.config import LoraOptions
from tests.support.tiny import VOCAB, tiny_llama

OPTS = LoraOptions(r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
LAMBDAS = (0.5, 0.1)  # orthogonality, L2
STEPS = 3


def two_adapter_model():
    """Tiny Llama with adapter task0 (B random: a trained first task) and task1 (new)."""
    model = olora.with_adapters(tiny_llama(seed=5), 1, OPTS, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return olora.with_adapters(model, 2, OPTS, seed=0)


def batch_rows(rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of the fixed global batch of 6 rows of 10 tokens."""
    ids = torch.randint(3, VOCAB, (6, 10), generator=torch.Generator().manual_seed(7))
    per = 6 // world_size
    return ids[rank * per : (rank + 1) * per]
