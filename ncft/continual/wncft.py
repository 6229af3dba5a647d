"""W-NCFT: weighted mixing of every trained task's neurons at inference time.

NCFT trains, for each task i in turn, only the task's NeuronSet S_i. W-NCFT keeps,
per task, S_i, a task vector v_i, and the values theta_i[S_i] of S_i's elements right
after task i was trained (`TaskStore.capture`). At inference on task j it sets every
element owned by any task to a mixture of the tasks' trained values, weighted by how
similar task j's inputs are to each task (`mixed`), evaluates, and puts the exact
previous values back.

Choices the paper leaves open, made here:

(a) Vectors. v_i is the mean last-layer hidden state (`hidden_states[layer]`, after
    the final norm for HF Llama-like models) over the non-pad PROMPT tokens of N of
    task i's training examples, computed right after task i is trained. The query q_j
    is the same statistic over task j's evaluation prompts, computed on the current
    model before mixing. Both use prompts only, because a query cannot contain
    answers. No task id is used beyond "these inputs form one batch of one task".
    Weights are `softmax(cos(q_j, v_i) / T)` over the tasks captured so far.
(b) Overlapping neurons. Let theta_0 be the pretrained value of an element and
    Delta_i = theta_i - theta_0 on S_i (task i's trained neurons relative to the base,
    including what earlier tasks sharing the element did to it). An element owned by
    the tasks O receives theta_0 + sum_{i in O} w_i Delta_i: the weighted sum of its
    owners' deltas.
(c) Unowned elements (in no S_i, and every non-selected parameter) are left as they
    are. Under NCFT they still hold their pretrained values.
(d) No renormalisation over owners: w_i multiplies Delta_i as is. Renormalising would
    give an element owned by one task that task's full value however dissimilar the
    task is, so the weights would only matter where tasks overlap; without it an
    irrelevant task's neurons fall back towards the base. With one-hot weights on
    task k, S_k's elements equal theta_k exactly (bit-identical) and other tasks'
    elements equal theta_0 (except where shared with S_k).

theta_0 of an element is read from the `before` snapshot of the FIRST task that
selects it. This relies on NCFT's invariant that training task i changes nothing
outside S_i, so before task i an element not yet owned still holds its base value.

Memory: nothing full-size is kept. The store holds, per task and parameter, the
selected rows/columns only (`index_select` on one gathered parameter at a time), plus
theta_0 on the union; mixing builds one parameter's union slice at a time (float64,
for exact one-hot weights). Every rank holds the same store, so every rank makes the
same edit, as `Engine.edited` requires.

Shapes: B batch rows, T tokens, D hidden size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ncft.data.examples import IGNORE, batches, collate, pad_id
from ncft.data.prompt import prompt_ids
from ncft.engine import Engine, device_of, eval_mode
from ncft.io import atomic_file, write_text
from ncft.neuron_set import NeuronSet

Slices = dict[str, torch.Tensor]  # fqn -> values of the selected rows/columns


# --- task and query vectors -----------------------------------------------------------


def prompt_batches(
    tokenizer, prompts: Sequence[str], batch_size: int, max_length: int, rank: int,
    world_size: int,
) -> list[dict[str, torch.Tensor]]:
    """This rank's collated batches of prompts, for `task_vector`.

    Prompts are tokenized as `ncft.data.examples.encode` tokenizes them (special prefix
    added, cut from the left with BOS kept). `labels` only marks real rows (a copy of
    the ids); the rows `batches(..., last="pad")` adds to even out ranks have all-IGNORE
    labels and are skipped by `task_vector`, so the result is world-size independent.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    encoded = []
    for prompt in prompts:
        t = torch.tensor(prompt_ids(tokenizer, prompt, max_length), dtype=torch.long)
        encoded.append({"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()})
    pad = pad_id(tokenizer)
    return [collate(share, pad)
            for share in batches(encoded, batch_size, rank, world_size, last="pad")]


def task_vector(
    engine: Engine, batches: Iterable[Mapping[str, torch.Tensor]], layer: int = -1
) -> torch.Tensor:
    """Mean hidden state over the non-pad tokens of all ranks' batches, float32 [D] on CPU.

    Sums and counts are taken in float64 and all-reduced before dividing, so the vector
    does not depend on how the samples are split over ranks. Every rank must pass the
    same number of batches (sharded forwards are collective). Rows whose `labels`, when
    present, are all IGNORE (`filler` rows) are skipped; labels are not passed to the
    model.

    Args:
        engine: The model.
        batches: This rank's collated batches (`prompt_batches`).
        layer: Index into the model's `hidden_states` (-1: last layer).
    """
    device = device_of(engine)
    total_D: torch.Tensor | None = None
    count = 0
    with torch.no_grad(), eval_mode(engine.module):
        for batch in batches:
            mask_BT = batch["attention_mask"].to(device).bool()
            if "labels" in batch:
                real_B = (batch["labels"].to(device) != IGNORE).any(dim=1)
                mask_BT &= real_B.unsqueeze(1)
            output = engine.forward({"input_ids": batch["input_ids"].to(device),
                                     "attention_mask": batch["attention_mask"].to(device),
                                     "output_hidden_states": True, "use_cache": False})
            hidden_BTD = output.hidden_states[layer]
            picked = hidden_BTD[mask_BT].double().sum(dim=0)
            total_D = picked if total_D is None else total_D + picked
            count += int(mask_BT.sum())
    if total_D is None:
        raise ValueError("task_vector needs at least one batch")
    both = engine.all_reduce_(torch.cat([total_D, torch.tensor([float(count)], device=device,
                                                               dtype=torch.float64)]))
    if float(both[-1]) == 0:
        raise ValueError("task_vector found no real tokens in the batches")
    return (both[:-1] / both[-1]).float().cpu()


def example_vectors(
    engine: Engine, batches: Iterable[Mapping[str, torch.Tensor]], layer: int = -1
) -> torch.Tensor:
    """Each real row's own mean hidden state over its non-pad tokens, float32 [N, D] on CPU.

    The per-example counterpart of `task_vector` (query `example`). Every rank must pass
    the SAME batches (all prompts, `prompt_batches(..., rank=0, world_size=1)`): a
    sharded forward is collective, and every rank then holds every example's vector
    without a gather. Filler rows (all-IGNORE `labels`) are dropped.
    """
    device = device_of(engine)
    out: list[torch.Tensor] = []
    with torch.no_grad(), eval_mode(engine.module):
        for batch in batches:
            mask_BT = batch["attention_mask"].to(device).bool()
            output = engine.forward({"input_ids": batch["input_ids"].to(device),
                                     "attention_mask": batch["attention_mask"].to(device),
                                     "output_hidden_states": True, "use_cache": False})
            hidden_BTD = output.hidden_states[layer].double()
            weights_BT = mask_BT.double()
            mean_BD = (hidden_BTD * weights_BT.unsqueeze(-1)).sum(1) / weights_BT.sum(1, True)
            if "labels" in batch:
                mean_BD = mean_BD[(batch["labels"].to(device) != IGNORE).any(dim=1)]
            out.append(mean_BD.float().cpu())
    if not out:
        raise ValueError("example_vectors needs at least one batch")
    return torch.cat(out)


def mixing_weights(
    query: torch.Tensor, task_vectors: Sequence[torch.Tensor], temperature: float
) -> torch.Tensor:
    """`softmax(cos(query, v_i) / temperature)` over tasks, float64 [num_tasks].

    Raises:
        ValueError: If there are no task vectors, the temperature is not positive
            (`wncft.temperature`), or the sizes differ.
    """
    if not task_vectors:
        raise ValueError("mixing_weights needs at least one task vector")
    if not temperature > 0:
        raise ValueError(f"wncft.temperature must be > 0, got {temperature}")
    vectors = torch.stack([v.detach().double().cpu().reshape(-1) for v in task_vectors])
    q = query.detach().double().cpu().reshape(1, -1)
    if vectors.shape[1] != q.shape[1]:
        raise ValueError(f"query has size {q.shape[1]}, task vectors {vectors.shape[1]}")
    cos = torch.nn.functional.cosine_similarity(q, vectors, dim=1)
    return torch.softmax(cos / temperature, dim=0)


# --- reading and writing selected slices ---------------------------------------------------


def snapshot(engine: Engine, nset: NeuronSet) -> Slices:
    """CPU copies of `nset`'s selected rows/columns, one gathered parameter at a time."""
    out: Slices = {}
    for fqn, sel in nset.entries.items():
        with engine.gathered([fqn]) as full:
            t = full[fqn]
            out[fqn] = t.index_select(sel.axis, sel.indices.to(t.device)).cpu().clone()
    return out


@dataclass(frozen=True)
class _Base:
    """theta_0 on the union of all captured selections of one parameter."""

    axis: int
    indices: torch.Tensor  # sorted union of the tasks' indices
    values: torch.Tensor  # theta_0 slices, in the parameter's dtype


class TaskStore:
    """Per-task NeuronSets, task vectors and trained slices, plus theta_0 on their union.

    Attributes:
        names: Task names, in training order.
        nsets: Each task's NeuronSet S_i.
        vectors: Each task's vector v_i (float32 [D]).
        values: Each task's trained slices theta_i[S_i].
        base: `fqn -> _Base`, theta_0 on the union of all S_i.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.nsets: list[NeuronSet] = []
        self.vectors: list[torch.Tensor] = []
        self.values: list[Slices] = []
        self.base: dict[str, _Base] = {}

    def __len__(self) -> int:
        return len(self.names)

    def capture(
        self, name: str, nset: NeuronSet, before: Slices, after: Slices, vector: torch.Tensor
    ) -> None:
        """Record task `name` after training it.

        Args:
            name: Task name.
            nset: The task's NeuronSet S_i (what was trained).
            before: `snapshot(engine, nset)` taken before training the task.
            after: `snapshot(engine, nset)` taken after training it.
            vector: The task vector (`task_vector`).
        """
        if name in self.names:
            raise ValueError(f"task {name!r} is already captured")
        for fqn, sel in nset.entries.items():
            for what, slices in (("before", before), ("after", after)):
                if fqn not in slices or slices[fqn].shape[sel.axis] != len(sel):
                    raise ValueError(f"{what} lacks the {len(sel)}-long slice of {fqn!r} "
                                     f"(axis {sel.axis}); use snapshot(engine, nset)")
            self._extend_base(fqn, sel.axis, sel.indices, before[fqn])
        self.names.append(name)
        self.nsets.append(nset)
        self.vectors.append(vector.detach().float().cpu().clone())
        self.values.append({fqn: after[fqn].detach().cpu().clone() for fqn in nset.entries})

    def _extend_base(self, fqn: str, axis: int, indices: torch.Tensor, before: torch.Tensor):
        old = self.base.get(fqn)
        if old is None:
            self.base[fqn] = _Base(axis, indices.clone(), before.detach().cpu().clone())
            return
        if old.axis != axis:
            raise ValueError(f"{fqn!r} is selected along axis {axis} here, {old.axis} before")
        new = ~torch.isin(indices, old.indices)
        if not bool(new.any()):
            return
        merged = torch.cat([old.indices, indices[new]])
        order = torch.argsort(merged)
        fresh = before.detach().cpu().index_select(axis, new.nonzero().squeeze(1))
        values = torch.cat([old.values, fresh], dim=axis).index_select(axis, order)
        self.base[fqn] = _Base(axis, merged[order], values)

    def weights(self, query: torch.Tensor, temperature: float) -> torch.Tensor:
        """Mixing weights of the captured tasks for `query` (`mixing_weights`)."""
        return mixing_weights(query, self.vectors, temperature)

    def mixture(self, fqn: str, weights: torch.Tensor) -> torch.Tensor:
        """theta_0 + sum_i w_i Delta_i on `fqn`'s union slice, in the parameter's dtype."""
        if len(weights) != len(self):
            raise ValueError(f"got {len(weights)} weights for {len(self)} captured tasks")
        base = self.base[fqn]
        base64 = base.values.double()
        acc = base64.clone()
        for w, nset, values in zip(weights.tolist(), self.nsets, self.values):
            sel = nset.entries.get(fqn)
            if sel is None:
                continue
            pos = torch.searchsorted(base.indices, sel.indices)
            delta = values[fqn].double() - base64.index_select(base.axis, pos)
            acc.index_add_(base.axis, pos, w * delta)
        return acc.to(base.values.dtype)

    def truncated(self, num: int) -> TaskStore:
        """The store of the first `num` tasks only (a resumed run's committed stages).

        theta_0 is kept on the union of the kept tasks' selections: it is the base value
        of every element whatever task first selected it, so dropping the later tasks'
        elements loses nothing the kept tasks need.
        """
        if num >= len(self):
            return self
        out = TaskStore()
        out.names, out.nsets = self.names[:num], self.nsets[:num]
        out.vectors, out.values = self.vectors[:num], self.values[:num]
        for fqn, base in self.base.items():
            owned = [n.entries[fqn].indices for n in out.nsets if fqn in n.entries]
            if not owned:
                continue
            keep = torch.isin(base.indices, torch.cat(owned)).nonzero().squeeze(1)
            out.base[fqn] = _Base(base.axis, base.indices[keep],
                                  base.values.index_select(base.axis, keep))
        return out

    # --- persistence (resume) ---

    def save(self, directory: str | Path) -> None:
        """Write the store as safetensors + JSON (and one NeuronSet per task)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, (nset, vector, values) in enumerate(zip(self.nsets, self.vectors, self.values)):
            nset.save(d / f"task{i}_neurons.safetensors")
            tensors[f"vector/{i}"] = vector
            tensors.update({f"values/{i}/{fqn}": v.contiguous() for fqn, v in values.items()})
        for fqn, b in self.base.items():
            tensors[f"base_indices/{fqn}"] = b.indices
            tensors[f"base_values/{fqn}"] = b.values.contiguous()
        with atomic_file(d / "wncft_store.safetensors") as tmp:
            save_file(tensors, tmp)
        meta = {"names": self.names, "axes": {fqn: b.axis for fqn, b in self.base.items()}}
        write_text(d / "wncft_store.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> TaskStore:
        """Read a store written by `save`.

        Raises:
            ValueError: If its files cannot be read, naming the file.
        """
        d = Path(directory)
        try:
            meta = json.loads((d / "wncft_store.json").read_text(encoding="utf-8"))
            tensors = load_file(d / "wncft_store.safetensors")
        except Exception as err:  # JSON and safetensors errors name no file
            raise ValueError(f"{d}: the W-NCFT task store (wncft_store.json, "
                             f"wncft_store.safetensors) is unreadable ({err})") from None
        store = cls()
        for i, name in enumerate(meta["names"]):
            nset = NeuronSet.load(d / f"task{i}_neurons.safetensors")
            store.names.append(name)
            store.nsets.append(nset)
            store.vectors.append(tensors[f"vector/{i}"])
            store.values.append({fqn: tensors[f"values/{i}/{fqn}"] for fqn in nset.entries})
        for fqn, axis in meta["axes"].items():
            store.base[fqn] = _Base(axis, tensors[f"base_indices/{fqn}"],
                                    tensors[f"base_values/{fqn}"])
        return store


# --- applying a mixture ---------------------------------------------------------------


def apply_mixture(engine: Engine, store: TaskStore, weights: torch.Tensor) -> Slices:
    """Write the mixture into the model, one parameter at a time; return the old slices.

    Pass the returned slices to `restore` to put the exact previous values back.
    """
    previous: Slices = {}
    for fqn, base in store.base.items():
        mixed = store.mixture(fqn, weights)
        with engine.edited([fqn]) as full:
            t = full[fqn]
            indices = base.indices.to(t.device)
            previous[fqn] = t.index_select(base.axis, indices).cpu().clone()
            t.index_copy_(base.axis, indices, mixed.to(t.device, t.dtype))
    return previous


def restore(engine: Engine, store: TaskStore, previous: Slices) -> None:
    """Write back the slices `apply_mixture` returned (bit-identical)."""
    for fqn, values in previous.items():
        base = store.base[fqn]
        with engine.edited([fqn]) as full:
            t = full[fqn]
            t.index_copy_(base.axis, base.indices.to(t.device), values.to(t.device, t.dtype))


@contextmanager
def mixed(engine: Engine, store: TaskStore, weights: torch.Tensor) -> Iterator[None]:
    """Evaluate inside: the model holds the mixture, and its previous values afterwards."""
    previous = apply_mixture(engine, store, weights)
    try:
        yield
    finally:
        restore(engine, store, previous)
