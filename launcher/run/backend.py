"""The services `ContinualLoop` needs from the launcher: models, engines, files, logs.

`LauncherBackend` is what the loop calls (`ncft.continual.services.Backend`); the run's
orchestration stays in `launcher.run.experiment`.
"""

from __future__ import annotations

import os
import signal
import weakref
from pathlib import Path
from typing import Any

import torch

from launcher.dist import DistInfo, barrier, print0
from launcher.engines import OptimConfig, build_engine
from launcher.engines.weights import INDEX, SINGLE, Replay, SafetensorsWeights
from launcher.run import manifest, preempt, progress, rundir
from launcher.run.checkpoint import gather_state_dict
from launcher.run.delta_weights import DeltaWeights
from launcher.spec import Spec
from launcher.spec.sections import section_config
from ncft import olora, sparse_delta
from ncft.continual.methods import method
from ncft.io import atomic_dir, write_json
from ncft.lora import apply_lora
from ncft.neuron_set import NeuronSet
from ncft.run_paths import STAGE_STATE, RunPaths
from ncft.train import StepLog

# Fault injection for the resume tests: SIGKILL rank KILL_RANK right after the
# checkpoint of stage N (1-based), after optimizer step K of stage N ("N:K"), or
# during stage N's evaluation, after its first task is evaluated ("N").
KILL_AFTER_STAGE = "NCFT_FAULT_KILL_AFTER_STAGE"
KILL_AT_STEP = "NCFT_FAULT_KILL_AT_STEP"
KILL_DURING_EVAL = "NCFT_FAULT_KILL_DURING_EVAL"
KILL_RANK = "NCFT_FAULT_KILL_RANK"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def optim_config(spec: Spec) -> OptimConfig:
    """The engine's optimizer settings from the spec's training section."""
    # lower_frozen is no spec option: frozen weights are always stored in the compute
    # dtype (launcher/engines/frozen.py); False exists for the tests' reference path.
    return section_config(OptimConfig, spec.training, compute_dtype=_DTYPES[spec.model.dtype],
                          lower_frozen=True)


def load_stage_model(spec: Spec, model_dir: str, stage: int | None,
                     weights: Path | None) -> torch.nn.Module:
    """The whole model of a run after stage `stage` (None: the base), fp32, on this rank.

    The model has the adapters the method trains (LoRA, or O-LoRA's stages 0..stage),
    so a stage checkpoint (`weights`, its `model.safetensors`) loads into it unchanged;
    `ncft.lora.merge_lora` folds them in. Rank 0's export and studies, and
    benchmarks/forgetting_diagnosis.py, read checkpoints through it.

    Raises:
        AssertionError: If the checkpoint does not fit the model (a different method).
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # fp32: the engine owns precision (fp32 masters, `model.dtype` is the compute
    # dtype, see launcher/engines/common.py).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    row = method(spec.method)
    if row.adapter_per_task and stage is not None:  # O-LoRA: stages 0..stage's adapters
        model = olora.freeze_all(olora.with_adapters(
            model, stage + 1, spec.lora.to_config(), spec.training.seed))
    elif row.lora and not row.adapter_per_task:
        lora = spec.lora
        model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules,
                           seed=spec.training.seed)
    if weights is not None:
        state = load_file(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected[:5]
        # A checkpoint stores tied weights once (SmolLM2 ties lm_head to the embeddings).
        assert not [m for m in missing if m in dict(model.named_parameters())], missing[:5]
    return model


class LauncherBackend:
    """The services `ContinualLoop` needs: models, engines, files and logs."""

    def __init__(self, spec: Spec, info: DistInfo, run: RunPaths, model_dir: str,
                 trained: RunPaths | None = None) -> None:
        """Services over run directory `run`.

        `trained` is the run whose stage weights and NeuronSets are read (default
        `run`; `ncft eval` reads a finished run and writes into a new one).
        """
        from transformers import AutoTokenizer

        self.spec, self.info, self.run, self.model_dir = spec, info, run, model_dir
        self.trained = trained or run
        # Models `load_model` built on meta -> (stage, where build_engine reads them).
        self._weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._kept: tuple[int | None, Replay] | None = None
        self._base: tuple[Path | None] | None = None  # resolved once (`_base_weights`)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        done = rundir.last_complete_stage(run)
        stage = done[0] + 1 if done else 0
        # The mid-task checkpoint the next stage continues from, decided once, on every
        # rank together (collective: `progress.resumable` verifies each rank's shard).
        self._progress: tuple[int, tuple[int, Path] | None] = (stage, None)
        if stage < len(spec.tasks):
            e = spec.engine
            self._progress = (stage, progress.resumable(
                run, stage, spec.tasks[stage].name, e.backend, info.world_size, info.rank,
                info.device))
        step = self.resume_step(stage) if stage < len(spec.tasks) else 0
        self.metrics = rundir.MetricsLog(run.metrics, info.is_main_process, (stage, step))
        self.board = None
        if spec.output.tensorboard and info.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run.tensorboard))

    def load_model(self, stage: int | None) -> torch.nn.Module:
        """The model after stage `stage` (None: the base model), ready for `build_engine`.

        Single, FSDP2 and ZeRO-3 get a meta-device model: `build_engine` fills each rank's
        shard from the files (`launcher.engines.loading`), or from what a scoring build
        of the same stage kept (`build_engine(keep_weights=True)`). FSDP1 with NCCL on
        several ranks: rank 0 loads, the others build on meta and receive rank 0's
        weights while wrapping (`sync_module_states`). Otherwise (FSDP1 on gloo, LoRA
        methods) every rank loads the whole model.
        """
        if self._sharded and (stage is not None or self._base_weights() is not None):
            model = self._meta_model()
            kept, self._kept = self._kept, None  # one use; a stale copy is dropped
            if kept is not None and kept[0] == stage:
                self._weights[model] = (stage, kept[1])
            else:
                path = self._weights_path(stage)
                self._weights[model] = (stage, SafetensorsWeights.from_path(path))
            return model
        if self._fsdp1_from_rank0 and not self.info.is_main_process:
            return self._meta_model()
        if self.info.world_size > 1:  # worth a line: host memory is one model per rank
            print(f"[rank {self.info.rank}] whole model loaded on this rank "
                  "(from_pretrained)", flush=True)
        return self.load_full_model(stage)

    def load_full_model(self, stage: int | None) -> torch.nn.Module:
        """The whole model with real weights on this rank (export, studies on rank 0)."""
        weights = None if stage is None else self._stage_dir(stage) / rundir.STAGE_MODEL
        return load_stage_model(self.spec, self.model_dir, stage, weights)

    def _weights_path(self, stage: int | None) -> Path:
        return self._base_weights() if stage is None else \
            self._stage_dir(stage) / rundir.STAGE_MODEL

    def _base_weights(self) -> Path | None:
        """The local directory of the base model's safetensors; None if it has none.

        A hub id resolves to its cached snapshot (safetensors and JSON files only). A
        model with `.bin` weights only is loaded whole by `from_pretrained` instead.
        """
        if self._base is None:
            path = Path(self.model_dir)
            if not path.is_dir():
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(self.model_dir,
                                              allow_patterns=["*.safetensors", "*.json"]))
            found = (path / INDEX).is_file() or (path / SINGLE).is_file()
            if not found:
                print0(f"{self.model_dir} has no safetensors weights: every rank loads the "
                       "whole model (from_pretrained)")
            self._base = (path if found else None,)
        return self._base[0]

    @property
    def _sharded(self) -> bool:
        # LoRA wraps modules after loading (peft), so its runs keep the whole-model path.
        return (self.spec.engine.backend in ("single", "fsdp2", "deepspeed")
                and not method(self.spec.method).lora)

    @property
    def _fsdp1_from_rank0(self) -> bool:
        # FSDP1's sync_module_states broadcasts rank 0's states; on gloo it refuses the
        # CPU tensors, so CPU runs load on every rank (launcher/engines/fsdp1.py).
        return (self.spec.engine.backend == "fsdp1" and self.info.backend == "nccl"
                and self.info.world_size > 1 and not method(self.spec.method).lora)

    def _meta_model(self) -> torch.nn.Module:
        """The model's structure on the meta device, set up as `from_pretrained` would."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        config = AutoConfig.from_pretrained(self.model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        try:  # generation on this rank must follow the same settings as on rank 0
            model.generation_config = GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            pass
        return model.eval()

    def build_engine(self, model: torch.nn.Module, keep_weights: bool = False):
        """Wrap `model` (filling it from its weights when `load_model` deferred them).

        Args:
            model: What `load_model` returned, trainables marked.
            keep_weights: Keep on this rank what the build reads from the files, so the
                next `load_model` of the same stage reads nothing (a stage's scoring
                engine, then its training engine). Costs one shard of host memory until
                then; the kept tensors are copies, untouched by what scoring does.
        """
        stage, weights = self._weights.pop(model, (None, None))
        deltas = sparse_delta.installed(model) if weights is not None else []
        if deltas:  # their start values are rows/columns of the base tensors in the files
            if isinstance(weights, Replay):
                # A scoring build's kept shards hold no other rank's rows: read again.
                weights = SafetensorsWeights.from_path(self._weights_path(stage))
            weights = DeltaWeights(weights, deltas)
        record = keep_weights and isinstance(weights, SafetensorsWeights)
        if record:
            weights.record()
        e = self.spec.engine
        engine = build_engine(e.backend, model, optim_config(self.spec), self.info,
                              e.ds_config, weights=weights)
        if record:
            self._kept = (stage, Replay(weights))
        if isinstance(weights, (SafetensorsWeights, DeltaWeights)):
            weights.close()
        return engine

    def save_neurons(self, task: str, nset: NeuronSet) -> None:  # noqa: D102
        if self.info.is_main_process:
            nset.save(self.run.neuron_file(task))

    def load_neurons(self, task: str) -> NeuronSet:  # noqa: D102
        return NeuronSet.load(self.trained.neuron_file(task))

    def _stage_dir(self, stage: int) -> Path:
        return self.trained.stage_dir(stage, self.spec.tasks[stage].name)

    def save_stage(self, engine, stage: int, state: dict[str, Any]) -> None:  # noqa: D102
        from safetensors.torch import save_file

        weights = gather_state_dict(engine)
        if self.info.is_main_process:
            target = self.run.stage_dir(stage, self.spec.tasks[stage].name)
            # Which engine trained the stage: a run resumed on another world size or
            # engine (a requeue onto fewer nodes) says so in its record.
            trained_on = {"backend": self.spec.engine.backend,
                          "world_size": self.info.world_size}
            with atomic_dir(target) as tmp:
                save_file({k: v.contiguous() for k, v in weights.items()},
                          tmp / rundir.STAGE_MODEL)
                write_json(tmp / STAGE_STATE, {"stage": stage, **state, "engine": trained_on})
                # Last: the manifest marks the checkpoint complete and lets a resume
                # verify every byte (`launcher.run.manifest`).
                manifest.seal_files(tmp, [rundir.STAGE_MODEL, STAGE_STATE])
            progress.clear(self.run, stage, self.spec.tasks[stage].name)
        barrier()
        self._fault(KILL_AFTER_STAGE, str(stage + 1))
        if preempt.agreed(engine.device):  # the stage is on disk: nothing more to save
            preempt.stop(f"after stage {stage + 1}")

    def resume_step(self, stage: int) -> int:  # noqa: D102
        first, found = self._progress
        return found[0] if stage == first and found else 0

    def restore_progress(self, engine, stage: int) -> None:  # noqa: D102
        first, found = self._progress
        assert stage == first and found is not None, f"no mid-task checkpoint of stage {stage}"
        progress.load(engine, found[1], self.spec.engine.backend)

    def after_step(self, engine, stage: int, step: int, total: int) -> None:  # noqa: D102
        preempt.fault_pause(f"{stage + 1}:{step}", self.info.rank)
        every = self.spec.output.checkpoint_every
        stop = preempt.agreed(engine.device)  # collective: every rank, every step
        # The last step normally gets save_stage; a stop request saves it here instead.
        if stop or (every and step % every == 0 and step < total):
            progress.save(engine, self.run, stage, self.spec.tasks[stage].name, step,
                          self.spec.engine.backend)
        self._fault(KILL_AT_STEP, f"{stage + 1}:{step}")
        if stop:
            preempt.stop(f"after step {step}/{total} of stage {stage + 1}")

    def after_eval(self, stage: int, task_index: int) -> None:  # noqa: D102
        if task_index == 0:
            self._fault(KILL_DURING_EVAL, str(stage + 1))

    def _fault(self, variable: str, point: str) -> None:
        if os.environ.get(variable) == point and \
                os.environ.get(KILL_RANK, "0") == str(self.info.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def log_step(self, stage: int, task: str, log: StepLog, lr: float) -> None:  # noqa: D102
        extra = {"skipped": True} if log.skipped else {}
        self.metrics.write(stage=stage, task=task, step=log.step, loss=log.loss,
                           grad_norm=log.grad_norm, lr=lr, **extra)
        if self.board is not None:
            for key, value in (("loss", log.loss), ("grad_norm", log.grad_norm), ("lr", lr)):
                self.board.add_scalar(f"{task}/{key}", value, log.step)

    def log_line(self, text: str) -> None:  # noqa: D102
        print0(text)

    @property
    def is_main_process(self) -> bool:
        """Rank 0, which writes the run directory's files."""
        return self.info.is_main_process

    def barrier(self) -> None:  # noqa: D102
        barrier()
