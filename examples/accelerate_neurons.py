r"""Train selected neurons in a plain accelerate loop (FSDP2, or any accelerate backend).

The user's own loop, with ncft's lines marked (see docs/library.md):

    neurons = ncft.score(model, loader, fraction=0.05)   # or ncft.NeuronSet.load(path)
    ncft.attach(model, neurons)                          # before accelerator.prepare
    ...the usual accelerate loop over model.parameters() that require grad...
    ncft.save_adapter(model, out / "adapter")            # every rank

Launch as users do:

    accelerate launch --config_file examples/accelerate/fsdp2.yaml \
        examples/accelerate_neurons.py --out out/acc_fsdp2

`--fsdp2` asks for the same plugin without a config file (`torchrun` launches).
accelerate applies FSDP on GPUs only: on CPU ranks it silently falls back to DDP
(`DistributedType.MULTI_CPU`). So on CPU this script shards the model itself with
torch's `fully_shard` per decoder layer and on the root (what accelerate's FSDP2
plugin does with `transformer_based_wrap`) and prepares only the data loader. That
is how the tests reach the FSDP2 path on 2 CPU ranks:

    torchrun --nproc-per-node 2 examples/accelerate_neurons.py --fsdp2 --out out/acc

Without `--neurons`, every rank scores its share of the SST-2 rows with `ncft.score`
(gradient attribution, all-reduced) and all select the same 5% of each layer's units.
`--score-only` writes that set to OUT/neurons.safetensors and stops (a set for the
ZeRO-3 Trainer example). Writes OUT/adapter, OUT/probe_logits.safetensors and
OUT/memory_rank{r}.json like examples/hf_trainer_neurons.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone

import neurons_common as common  # noqa: E402  (beside this file)

import ncft  # noqa: E402


def accelerator(args: argparse.Namespace):
    """The Accelerator: FSDP2 when asked (`--fsdp2`), else what `accelerate launch` set."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    kwargs = {"mixed_precision": "bf16" if args.bf16 else "no"}
    if args.fsdp2:
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)


def shard_like_accelerate(model) -> None:
    """FSDP2 as accelerate's plugin applies it: each decoder layer, then the root.

    Only where accelerate would not (CPU ranks): see the module docstring.
    """
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)


def state_bytes(model, optimizer) -> tuple[tuple[int, int], int]:
    """((gradient, optimizer) bytes this rank holds, full fine-tuning's on FSDP2)."""
    from ncft.engine import local_tensor

    params = list(model.parameters())
    grad_opt = common.grad_opt_bytes([p for p in params if p.requires_grad],
                                     optimizer.state, lambda p: local_tensor(p).numel())
    # Full fine-tuning: an fp32 gradient and two fp32 AdamW moments per local element.
    return grad_opt, 12 * sum(local_tensor(p).numel() for p in params)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, train, and write OUT (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--fsdp2", action="store_true",
                        help="use accelerate's FSDP2 plugin (torchrun launches)")
    parser.add_argument("--score-only", action="store_true",
                        help="write OUT/neurons.safetensors and stop")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    acc = accelerator(args)
    rank, world = acc.process_index, acc.num_processes
    path = common.model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if args.bf16 else torch.float32).to(acc.device)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if args.neurons is not None:
        neurons = ncft.NeuronSet.load(args.neurons)
    else:  # every rank scores its share; the scores are all-reduced
        neurons = ncft.score(model, common.score_loader(tokenizer, args.rows, rank, world),
                             fraction=args.fraction)
    if args.score_only:
        if acc.is_main_process:
            args.out.mkdir(parents=True, exist_ok=True)
            neurons.save(args.out / "neurons.safetensors")
            print(f"wrote {args.out}/neurons.safetensors: {neurons}", flush=True)
        return
    ncft.attach(model, neurons)  # before prepare: FSDP2 then shards the deltas too

    with acc.main_process_first():
        text = common.train_text(args.out, args.rows) if acc.is_main_process \
            else args.out / "train.txt"
    data = common.LmRows(text, tokenizer, args.seq_len, args.steps,
                         args.micro_batch_size * world, args.seed)
    # In order (no shuffle) so the run compares step for step with ncft masked-train.
    loader = torch.utils.data.DataLoader(data, batch_size=args.micro_batch_size,
                                         shuffle=False, drop_last=True)
    from accelerate.utils import DistributedType

    by_hand = args.fsdp2 and acc.distributed_type != DistributedType.FSDP
    if by_hand:  # CPU ranks: accelerate would use DDP (module docstring)
        shard_like_accelerate(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay)
    if by_hand:
        loader = acc.prepare(loader)
    else:
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        acc.backward(loss)
        norm = acc.clip_grad_norm_(trainable, args.grad_clip) if not by_hand else \
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        if acc.is_main_process:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} grad_norm "
                  f"{float(norm):.4g}", flush=True)

    grad_opt, full = state_bytes(model, optimizer)
    total = sum(math.prod(s) for s in shapes.values())
    common.write_report(args.out, rank, world, "fsdp2" if args.fsdp2 else "accelerate",
                        grad_opt, full, common.selected_numel(neurons, shapes), total)
    probe = tokenizer(common.PROBE, return_tensors="pt")["input_ids"].to(acc.device)
    model.eval()
    with torch.no_grad():  # every rank: FSDP2 gathers collectively
        logits = model(input_ids=probe).logits.float().cpu()
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file({"input_ids": probe.cpu(), "logits": logits},
                  str(args.out / "probe_logits.safetensors"))
    ncft.save_adapter(model, args.out / "adapter")  # every rank; rank 0 writes
    if acc.is_main_process:
        print(f"wrote {args.out}/adapter", flush=True)
    acc.end_training()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
