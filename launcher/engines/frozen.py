"""Frozen parameters in the compute dtype, with their exact values kept on the host.

A parameter that no optimizer steps never changes during training, so it needs no
fp32 master on the device: with `compute_dtype=bfloat16` the single and FSDP2
engines store it in bf16 (what forward and backward read anyway), which halves the
memory of a frozen base (`training.update=sparse_delta`: every matrix; `masked`:
everything outside the masked projections). Trainable parameters keep fp32 masters.

Exports and stage checkpoints must still hold the source checkpoint's values bit
for bit. `FrozenStore` keeps, per lowered parameter and in this rank's host memory,
only what the low-precision copy cannot represent:

- nothing, when every element is exact in the compute dtype (a bf16 source file);
- the differing elements as a patch (flat positions and fp32 values), when few
  are (a bf16 source after `ncft.sparse_delta.write_back` copied trained values in);
- otherwise the whole local piece in the smallest exact dtype (fp16 for an fp16
  source, fp32 for an fp32 one), as ZeRO-3 keeps its fp32 partitions
  (`launcher.engines.zero3`).

`exact(name, low)` rebuilds the fp32 values; `write(name, low, values)` stores new
values (an `edited` block): the device copy gets them rounded, the host their rest.
The single engine lowers only the weights that matrix products read
(`matmul_weights`): under autocast that changes no computed value. A parameter's
trainable set never changes within an engine (each stage builds its own), so the
lowered set is fixed at build time; that also keeps FSDP2 clear of
PyTorch #186998 (a module first run frozen, then unfrozen, under
`MixedPrecisionPolicy`).
"""

from __future__ import annotations

import torch
from torch import nn

# A patch costs 12 bytes per differing element (int64 position + fp32 value): below
# this share of elements it is smaller than a dense fp32 copy.
PATCH_MAX_SHARE = 1 / 4


def lowers(compute_dtype: torch.dtype) -> bool:
    """True when frozen parameters are stored in `compute_dtype` (bf16/fp16 compute)."""
    return compute_dtype != torch.float32


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # fp32 bit patterns: -0.0 differs from 0.0, and a NaN equals itself.
    return a.view(torch.int32) == b.view(torch.int32)


class FrozenStore:
    """The lowered frozen parameters of one engine and their exact host values.

    Args:
        dtype: The compute dtype frozen parameters are stored in.

    Attributes:
        names: FQNs of the lowered parameters.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.names: set[str] = set()
        self._dense: dict[str, torch.Tensor] = {}
        self._patch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def lower(self, model: nn.Module, only: set[str] | None = None) -> None:
        """Store every frozen floating-point parameter of `model` in the compute dtype.

        Real tensors are recorded first (whole: callers that shard afterwards call
        `keep_rows`); meta tensors just change dtype and are recorded when filled.

        Args:
            model: The unwrapped model, trainables marked.
            only: Lower only these names (None: every frozen parameter).
        """
        for name, p in model.named_parameters():
            if p.requires_grad or not p.is_floating_point():
                continue
            if only is not None and name not in only:
                continue
            self.names.add(name)
            if not p.is_meta:
                self.record(name, p.detach())
            p.data = p.data.to(self.dtype)

    def record(self, name: str, values: torch.Tensor) -> None:
        """Keep what the compute dtype loses of `values` (this rank's piece of `name`)."""
        self._dense.pop(name, None)
        self._patch.pop(name, None)
        if values.dtype == self.dtype or values.numel() == 0:
            return
        # A copy of its own: `values` may be a view of a larger tensor (a gathered one).
        exact = values.detach().to("cpu", torch.float32, copy=True).reshape(-1)
        rounded = exact.to(self.dtype).float()
        differ = ~_same_bits(rounded, exact)
        count = int(differ.sum())
        if count == 0:
            return
        if count <= PATCH_MAX_SHARE * exact.numel():
            where = differ.nonzero().view(-1)
            self._patch[name] = (where, exact[where].clone())
            return
        for dtype in (torch.float16, torch.float32):  # the smallest exact host dtype
            kept = exact.to(dtype)
            if dtype == torch.float32 or bool(_same_bits(kept.float(), exact).all()):
                self._dense[name] = kept
                return

    def keep_rows(self, name: str, lo: int, hi: int, shape: tuple[int, ...]) -> None:
        """Trim a whole-tensor record to rows `[lo, hi)` (after sharding on dim 0)."""
        width = 1
        for size in shape[1:]:
            width *= size
        self.keep_range(name, lo * width, hi * width)

    def keep_range(self, name: str, start: int, stop: int) -> None:
        """Trim a whole-tensor record to flat elements `[start, stop)` (a flat shard)."""
        if name in self._dense:
            self._dense[name] = self._dense[name][start:stop].clone()
        elif name in self._patch:
            where, vals = self._patch[name]
            keep = (where >= start) & (where < stop)
            self._patch[name] = (where[keep] - start, vals[keep])

    def exact(self, name: str, low: torch.Tensor) -> torch.Tensor:
        """The exact fp32 values of this rank's piece `low` of `name`, on its device."""
        if name in self._dense:
            return self._dense[name].to(low.device, torch.float32).view(low.shape)
        out = low.detach().float()
        if name in self._patch:
            where, vals = self._patch[name]
            out.view(-1).index_copy_(0, where.to(low.device), vals.to(low.device))
        return out

    @torch.no_grad()
    def write(self, name: str, low: torch.Tensor, values: torch.Tensor) -> None:
        """Store `values` as this rank's piece of `name`: rounded on device, rest on host."""
        low.copy_(values)
        self.record(name, values)

    def host_bytes(self) -> int:
        """Bytes of exact values kept in host memory on this rank."""
        dense = sum(t.numel() * t.element_size() for t in self._dense.values())
        patch = sum(w.numel() * 8 + v.numel() * 4 for w, v in self._patch.values())
        return dense + patch


def frozen_store(model: nn.Module, compute_dtype: torch.dtype, enabled: bool = True,
                 only: set[str] | None = None) -> FrozenStore | None:
    """Lower `model`'s frozen parameters to `compute_dtype`; None when nothing is lowered.

    Call after the caller marked what trains (`requires_grad`) and cast the model to
    fp32, before wrapping: FSDP2 shards what it is given. `only` limits the lowering
    to those names (the single engine: `matmul_weights`).
    """
    if not (enabled and lowers(compute_dtype)):
        return None
    store = FrozenStore(compute_dtype)
    store.lower(model, only)
    return store


def matmul_weights(model: nn.Module) -> set[str]:
    """Names of the weights only matrix products read: Linear and GPT-2 Conv1D weights.

    Under autocast (the single engine) a product casts its fp32 weight to the compute
    dtype, so storing such a weight there changes no computed value. Embeddings,
    norms and biases are read in fp32 by other ops (the residual stream starts as the
    embedding's fp32 output), so they stay fp32 and a bf16 single run computes what
    it did before. A weight tied to an embedding (`tie_word_embeddings`) is left out.
    """
    from transformers.pytorch_utils import Conv1D

    products = (nn.Linear, Conv1D)
    other = {id(p) for m in model.modules() if not isinstance(m, products)
             for p in m.parameters(recurse=False)}
    out = set()
    for prefix, module in model.named_modules():
        weight = getattr(module, "weight", None) if isinstance(module, products) else None
        if isinstance(weight, nn.Parameter) and id(weight) not in other:
            out.add(f"{prefix}.weight" if prefix else "weight")
    return out
