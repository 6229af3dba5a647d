r"""Train selected neurons with the HF `Trainer`: DeepSpeed ZeRO-3 or FSDP2.

The user's own training script, with four ncft lines (see docs/library.md):

    neurons = ncft.NeuronSet.load(path)       # or ncft.score(...)
    ncft.attach(model, neurons)               # before Trainer wraps the model
    trainer.train()
    ncft.save_adapter(model, out / "adapter") # every rank, like trainer.save_model()

ZeRO-3 (runs on CPU too, DeepSpeed's CPU accelerator; `TrainingArguments` is built
before `from_pretrained`, so the weights are partitioned at load and `attach` builds
the deltas from each rank's partition):

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/hf_trainer_neurons.py \
        --engine zero3 --neurons sst2.safetensors --out out/hf_zero3

FSDP2 (GPU: `Trainer` refuses FSDP on CPU, "Using fsdp only works in distributed
training"; on CPU use examples/accelerate_neurons.py):

    torchrun --nproc-per-node 8 examples/hf_trainer_neurons.py --engine fsdp2 --bf16 \
        --neurons sst2.safetensors --out out/hf_fsdp2

Without `--neurons`, FSDP2 runs select 5% of every layer's units with `ncft.score`
on the SST-2 rows first (under ZeRO-3 the partitioned model cannot run a forward
before the Trainer builds its engine: pass a set from `ncft neurons score`, or from
examples/accelerate_neurons.py --score-only).

Writes OUT/adapter (ncft.save_adapter), OUT/probe_logits.safetensors (the trained
model's logits on one SST-2 prompt, for checking a reload) and OUT/memory_rank{r}.json
(gradient + optimizer bytes this rank holds, against full fine-tuning's).
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


def training_args(args: argparse.Namespace):
    """`TrainingArguments` with the engine's config: build them BEFORE from_pretrained."""
    from transformers import TrainingArguments

    engine = {}
    if args.engine == "zero3":
        engine["deepspeed"] = {
            "zero_optimization": {"stage": 3},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True,
        }
    else:
        engine.update(fsdp="full_shard", fsdp_config={"version": 2})
    return TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.grad_clip,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, bf16=args.bf16,
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        dataloader_drop_last=True, remove_unused_columns=False,
        # On CPU ranks (DeepSpeed's CPU accelerator) TrainingArguments counts one
        # process unless told it is a CPU job.
        use_cpu=not torch.cuda.is_available(), **engine,
    )


def in_order_trainer():
    """A `Trainer` that reads the dataset in order (to compare with ncft masked-train)."""
    from transformers import Trainer

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    return InOrderTrainer


def state_bytes(trainer, model, engine: str) -> tuple[tuple[int, int], int]:
    """((gradient, optimizer) bytes this rank holds, full fine-tuning's on this engine)."""
    from ncft.masks.layout import chunk_rows, flat_partition

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    params = list(model.parameters())
    if engine == "zero3":
        optimizer = trainer.model_wrapped.optimizer.optimizer  # the client AdamW
        local = lambda p: p.ds_tensor.numel()  # noqa: E731
        full_local = lambda p: flat_partition(p.ds_numel, world, rank)[2]  # noqa: E731
    else:
        optimizer = trainer.optimizer
        local = lambda p: p.to_local().numel()  # noqa: E731

        def full_local(p):
            lo, hi = chunk_rows(p.shape[0], world, rank)
            return (hi - lo) * math.prod(p.shape[1:])
    measured = common.grad_opt_bytes([p for p in params if p.requires_grad], optimizer.state,
                                     local)
    # Full fine-tuning on the same engine: an fp32 gradient and two fp32 AdamW moments
    # for every element this rank owns.
    full = 12 * sum(full_local(p) for p in params)
    return measured, full


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, train, and write OUT (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--engine", choices=("zero3", "fsdp2"), default="zero3")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ncft.param_shards import full_shape, is_zero3

    targs = training_args(args)  # first: under ZeRO-3, from_pretrained now partitions
    rank, world = targs.process_index, targs.world_size
    if args.engine == "zero3":
        import deepspeed

        # zero.Init (inside from_pretrained) takes the world size from deepspeed.comm:
        # attach it to the process group TrainingArguments started.
        deepspeed.init_distributed(torch.distributed.get_backend(), dist_init_required=False)
    path = common.model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    shapes = {n: full_shape(p) for n, p in model.named_parameters()}
    # Under ZeRO-3 every weight is already a partition here; attach reads those.
    partitioned = all(is_zero3(p) for p in model.parameters())
    if args.neurons is not None:
        neurons = ncft.NeuronSet.load(args.neurons)
    elif args.engine == "zero3":
        raise SystemExit("--engine zero3 needs --neurons (see this file's docstring)")
    else:
        neurons = ncft.score(model, common.score_loader(tokenizer, args.rows, rank, world),
                             fraction=args.fraction)
    ncft.attach(model, neurons)

    with targs.main_process_first(desc="write the training text"):
        text = common.train_text(args.out, args.rows) if rank == 0 else args.out / "train.txt"
    data = common.LmRows(text, tokenizer, args.seq_len, args.steps,
                         args.micro_batch_size * world, args.seed)
    trainer = in_order_trainer()(model=model, args=targs, train_dataset=data)
    trainer.train()

    measured, full = state_bytes(trainer, model, args.engine)
    total = sum(math.prod(s) for n, s in shapes.items())
    common.write_report(args.out, rank, world, args.engine, measured, full,
                        common.selected_numel(neurons, shapes), total,
                        partitioned_at_load=partitioned)
    probe = tokenizer(common.PROBE, return_tensors="pt")["input_ids"].to(targs.device)
    trainer.model_wrapped.eval()
    with torch.no_grad():  # every rank: the engine's hooks gather collectively
        logits = trainer.model_wrapped(input_ids=probe).logits.float().cpu()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"input_ids": probe.cpu(), "logits": logits},
                  str(args.out / "probe_logits.safetensors"))
    ncft.save_adapter(model, args.out / "adapter")  # every rank; rank 0 writes
    if rank == 0:
        print(f"wrote {args.out}/adapter", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
