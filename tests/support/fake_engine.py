"""A process-group-free `ncft.engine.Engine` for unit tests.

`FakeEngine` wraps a plain module like `SingleEngine` does. `ThreadWorld` runs several
fake ranks as threads whose `all_reduce_` really sums over the ranks (through a
barrier), so rank-sharding logic is tested without spawning processes. A rank that
calls `all_reduce_` fewer times than the others makes the barrier time out, the way a
real collective would hang. `forwards` counts forward calls: sharded engines need the
same count on every rank.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class ThreadWorld:
    """`world_size` fake ranks; `run(fn)` calls `fn(engine)` on each in its own thread."""

    def __init__(self, world_size: int, timeout_s: float = 30.0) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[torch.Tensor | None] = [None] * world_size

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self._slots[rank] = tensor.detach().clone()
        self._barrier.wait()
        total = self._slots[0].clone()
        for other in self._slots[1:]:
            total += other
        self._barrier.wait()  # nobody overwrites a slot before everyone has summed
        tensor.copy_(total)
        return tensor

    def run(self, module: nn.Module, fn: Callable[[FakeEngine], Any]) -> list[Any]:
        """Give each rank its own copy of `module`; return each rank's `fn` result."""
        engines = [FakeEngine(copy.deepcopy(module), r, self.world_size, self)
                   for r in range(self.world_size)]
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def target(r: int) -> None:
            try:
                results[r] = fn(engines[r])
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        # One intra-op thread per rank, as spawned workers run (OMP_NUM_THREADS=1);
        # otherwise rank threads oversubscribe the cores.
        num_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            torch.set_num_threads(num_threads)
        if errors:
            raise errors[0]
        self.engines = engines
        return results


class FakeEngine:
    """The Engine protocol over an unsharded module (forward, gathered, edited, all-reduce)."""

    def __init__(
        self, module: nn.Module, rank: int = 0, world_size: int = 1,
        world: ThreadWorld | None = None,
    ) -> None:
        self.module, self.rank, self.world_size, self._world = module, rank, world_size, world
        self.optimizer = None
        self.forwards = 0
        self.edits = 0

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        self.forwards += 1
        return self.module(**batch)

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    @contextmanager
    def gathered(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        params = self._params()
        yield {n: params[n].detach() for n in fqns}

    @contextmanager
    def edited(self, fqns: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        params = self._params()
        self.edits += 1
        with torch.no_grad():
            yield {n: params[n].data for n in fqns}

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world is None:
            return tensor
        return self._world.all_reduce(self.rank, tensor)
