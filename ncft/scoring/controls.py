"""Controls the papers compare against: random neurons, and matched random sets.

Randomness is a pure function of `(seed, group name)`: each group draws from its own
generator seeded by a hash of both, so every rank draws the same set, and adding or
dropping one group does not change what the others draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ncft.engine import Engine
from ncft.scoring.groups import Group, Scores


def group_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by `sha256(f"{seed}:{name}")` (platform independent)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class RandomScorer:
    """Scores every candidate with an i.i.d. uniform draw: top-k of them is a random set.

    Attributes:
        seed: Seed of the draw (shared by every rank).
    """

    seed: int = 0
    name: str = "random"

    def score(self, engine: Engine | None, groups: Sequence[Group]) -> Scores:
        """Random scores per group; `engine` is unused (no model pass is needed)."""
        del engine
        return {
            g.name: torch.rand(g.size, generator=group_generator(self.seed, g.name),
                               dtype=torch.float64)
            for g in groups
        }

    def meta(self) -> dict[str, Any]:
        """What a NeuronSet built from these scores records."""
        return {"scorer": self.name, "seed": self.seed}
