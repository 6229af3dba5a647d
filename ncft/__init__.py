"""ncft: neuron-level fine-tuning.

The library API, for the user's own training code (`docs/library.md`):
`NeuronSet`, `attach`, `save_adapter`, `load_adapter`, `merge`, `score`. They are
imported on first use, so `import ncft` stays cheap (no torch, no transformers) and
never pulls in an engine library.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "NeuronSet": "ncft.neuron_set",
    "attach": "ncft.adapter",
    "save_adapter": "ncft.adapter",
    "load_adapter": "ncft.adapter",
    "merge": "ncft.adapter",
    "score": "ncft.selection.from_loader",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ncft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
