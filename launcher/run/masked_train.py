"""`ncft masked-train`: train a model for N steps with a NeuronSet on any engine.

The smallest end-to-end use of the masks: load a HF model, freeze everything the
NeuronSet does not name, build the engine, train with masks, export the
consolidated model and a report of which elements changed (rank 0). The report is
the proof users ask for: `outside_selection_changed` must be 0 for every parameter.
`--update sparse_delta` trains the same elements as small delta parameters
(`ncft.sparse_delta`) instead of masked full matrices, and writes them back before
the export.
"""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.dist import init_distributed, print0, shutdown
from launcher.engines import OptimConfig, build_engine
from launcher.run.checkpoint import export_hf, iter_saved_tensors
from launcher.run.masked_train_args import MaskedTrainArgs
from launcher.run.models import resolve_model
from ncft import sparse_delta
from ncft.arch import get_adapter
from ncft.data.text import lm_steps, token_blocks
from ncft.io import write_json
from ncft.masks.install import freeze_unselected, install
from ncft.neuron_set import NeuronSet
from ncft.train import StepLog, train


def random_unit_set(model, fraction: float, seed: int) -> NeuronSet:
    """Random neuron units, `fraction` of every layer (seeded, rank-independent)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    blocks = get_adapter(model).mlp_blocks(model)
    gen = torch.Generator().manual_seed(seed)
    units = {
        b.layer: torch.randperm(b.d_ff, generator=gen)[: max(1, round(fraction * b.d_ff))]
        for b in blocks
    }
    return NeuronSet.from_units(blocks, units, meta={"scorer": "random", "fraction": fraction})


def change_report(final: dict[str, torch.Tensor], model_dir: str, nset: NeuronSet) -> dict:
    """Per parameter: changed elements, and changed elements outside the selection."""
    report = {}
    for name, before in iter_saved_tensors(Path(model_dir)):
        if name not in final:
            continue
        changed = final[name].to(before.dtype) != before
        allowed = nset.dense_mask(name, changed.shape)
        report[name] = {
            "selected": int(allowed.sum()),
            "changed": int(changed.sum()),
            "outside_selection_changed": int((changed & ~allowed).sum()),
        }
    return report


def run(args: MaskedTrainArgs) -> None:
    """One rank's job (call on every rank, or via `launcher.run.spawn.run_local`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.update not in sparse_delta.UPDATE_MODES:
        raise ValueError(f"--update must be one of {list(sparse_delta.UPDATE_MODES)}, "
                         f"got {args.update!r}")
    info = init_distributed()
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    nset = (
        NeuronSet.load(args.neurons) if args.neurons
        else random_unit_set(model, args.fraction, args.seed)
    )
    deltas = None
    if args.update == "sparse_delta":
        deltas = sparse_delta.install(model, nset.entries)
    else:
        freeze_unselected(model, nset.entries)
    config = model.config
    cfg = OptimConfig(
        lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        grad_accum=args.grad_accum, micro_batch_size=args.micro_batch_size,
        compute_dtype=_compute_dtype(args.dtype),
    )
    engine = build_engine(args.backend, model, cfg, info, ds_config=args.ds_config)
    plan = install(engine, nset.entries) if deltas is None else None
    blocks = token_blocks(args.data, tokenizer, args.seq_len)
    steps = lm_steps(
        blocks, args.steps, args.micro_batch_size, args.grad_accum, info.rank,
        info.world_size, args.seed,
    )

    def log(entry: StepLog) -> None:
        print0(
            f"step {entry.step}/{args.steps} loss {entry.loss:.4f} "
            f"grad_norm {entry.grad_norm:.4g}"
        )

    logs = train(engine, steps, plan, on_step=log)
    if deltas is not None:
        sparse_delta.write_back(engine, deltas)
    out = Path(args.out)
    export_hf(engine, config, out / "model", tokenizer)
    if info.is_main_process:
        final = _load_dir(out / "model")
        nset.save(out / "neurons.safetensors")
        write_json(out / "report.json", {
            "backend": args.backend, "update": args.update, "world_size": info.world_size,
            "steps": args.steps,
            "losses": [e.loss for e in logs], "grad_norms": [e.grad_norm for e in logs],
            "parameters": change_report(final, model_dir, nset),
        })
        print0(f"wrote {out}/model, {out}/report.json")
    engine.close()
    shutdown()


def _compute_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype: {name!r} is not one of float32, bfloat16, float16")
    return getattr(torch, name)


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_saved_tensors(path))
