"""The experiment spec: one YAML file, validated into a typed tree of pydantic models.

Sections mirror what they configure: `model`, `engine`, `data_root`, `tasks`,
`selection`, `training`, `method`, `lora`, `olora`, `wncft`, `study`, `eval`, `output`.
The section models live in `launcher.spec.sections`, `.method_sections` and
`.eval_sections`, the task models in `launcher.spec.tasks`; this module assembles them
into `Spec`, with the checks that span sections, and loads, overrides and dumps specs.
Unknown keys are errors, and every problem is reported at its YAML path
(`tasks[1].source.name: ...`) through `SpecError`.

Relative paths (`data_root`, json source files, `output.dir`, a `.json` `engine.ds_config`)
are resolved against the directory of the spec file (the working directory when a spec
is validated from a dict), and cl_benchmark/translation files against `data_root`. The
resolved spec holds absolute paths, so `dump_resolved` output loads back unchanged from
anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from launcher.spec.eval_sections import EvalSpec, StudySpec
from launcher.spec.method_sections import LoraSpec, OloraSpec, SelectionSpec, WncftSpec
from launcher.spec.overrides import apply_override, problem_lines
from launcher.spec.sections import (
    MODULES,
    EngineSpec,
    ModelSpec,
    OutputSpec,
    TrainingSpec,
    _Section,
)
from launcher.spec.stages import describe_stages
from launcher.spec.tasks import (
    CONTINUAL_METHODS,
    SINGLE_TASK_METHODS,
    Problems,
    TaskSpec,
    absolute,
    base_dir,
    method,
    resolve_task_data,
)

if TYPE_CHECKING:
    from ncft.continual.config import LoopConfig
    from ncft.selection.pipeline import SelectConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

class SpecError(ValueError):
    """An invalid spec; `problems` holds one `<yaml.path>: <what is wrong>` line each."""

    def __init__(self, problems: Sequence[str], source: str | Path | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid spec{where} ({len(self.problems)} problem(s)):\n{lines}")


def default_data_root() -> Path | None:
    """Env `NCFT_DATA_ROOT`, else the repository's own `data/` if it exists, else None.

    The benchmark subsets ship inside the repository (`data/README.md`), so a fresh
    clone runs its examples with no other folder beside it.
    """
    env = os.environ.get("NCFT_DATA_ROOT")
    if env:
        return Path(env).expanduser().absolute()
    shipped = REPO_ROOT / "data"
    return shipped if shipped.is_dir() else None


class Spec(_Section):
    """A whole experiment: model, engine, data, tasks, method and outputs."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="Pretrained model.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Distributed engine.")
    data_root: Path | None = Field(
        None,
        validate_default=True,
        description="Folder holding cl_benchmark/ and translation_en_es/; default "
        "NCFT_DATA_ROOT, else the repository's data/.",
    )
    tasks: list[TaskSpec] = Field(min_length=1, description="Tasks, in training order.")
    selection: SelectionSpec = Field(default_factory=SelectionSpec, description="Neurons.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimizer.")
    method: Literal[SINGLE_TASK_METHODS + CONTINUAL_METHODS] = Field(  # type: ignore[valid-type]
        description="full, neurons, random_neurons, lora (one task) or seqft, seqlora, olora, "
        "ncft, wncft, per_task (continual, >= 2 tasks); see ncft/continual/methods.py."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA (lora, seqlora, olora).")
    olora: OloraSpec = Field(default_factory=OloraSpec, description="O-LoRA loss weights.")
    wncft: WncftSpec = Field(default_factory=WncftSpec, description="W-NCFT mixing.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation.")
    study: StudySpec = Field(default_factory=StudySpec, description="Neuron studies.")
    output: OutputSpec = Field(description="Run directory.")

    @field_validator("data_root")
    @classmethod
    def _resolve_data_root(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return default_data_root() if path is None else absolute(path, base_dir(info))

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        problems = method_problems(self.method, len(self.tasks))
        if self.training.update == "sparse_delta" and not method(self.method).selects:
            problems.append(("training.update", f"sparse_delta trains a NeuronSet's selected "
                             f"rows/columns, and method {self.method} selects none (full or "
                             "LoRA training); set training.update: masked"))
        problems += _distill_problems(self)
        names = [t.name for t in self.tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((f"tasks[{i}].name", f"duplicate task name {name!r}"))
        for i, task in enumerate(self.tasks):
            problems += [(f"tasks[{i}].{p}", m) for p, m in resolve_task_data(task, self.data_root)]
        if self.model.dtype == "float16" and self.engine.backend != "deepspeed":
            problems.append(("model.dtype", f"float16 needs loss scaling, which only "
                             f"engine.backend=deepspeed does (got {self.engine.backend}); "
                             "use bfloat16"))
        if self.selection.seed is None:
            self.selection.seed = self.training.seed
        if self.study.similarity in ("paper", "both") and method(self.method).lora:
            # Its M_i are full fine-tunes of the base model; a LoRA run's loaded model
            # carries adapters, whose module names the FFN-unit readers do not know.
            problems.append(("study.similarity", f"paper needs a method without LoRA "
                             f"adapters, not {self.method}; use final_model"))
        if self.eval.calibration != "none":
            if self.eval.classification != "rank":
                problems.append(("eval.calibration", "content_free calibrates label scores, "
                                 "which eval.classification: generate has none of; set "
                                 "eval.classification: rank or eval.calibration: none"))
            if method(self.method).mixes and self.wncft.query == "example":
                problems.append(("eval.calibration", "wncft.query: example gives each "
                                 "example its own mixture, so there is no one prior to "
                                 "divide by; use wncft.query: task or eval.calibration: none"))
        if problems:
            raise Problems(problems)
        return self

    def loop_config(self) -> LoopConfig:
        """What `ncft.continual.loop.ContinualLoop` reads, built from the sections."""
        from ncft.continual.config import LoopConfig

        return LoopConfig(
            method=self.method, training=self.training.to_config(),
            eval=self.eval.to_config(), wncft=self.wncft.to_config(),
            olora=self.olora.to_config(), lora=self.lora.to_config(),
            log_every=self.output.log_every, loss_scaler=self.model.dtype == "float16",
        )

    def select_config(self) -> SelectConfig:
        """What `ncft.selection.pipeline.SelectionPipeline` reads."""
        return self.selection.to_config(model_id=self.model.name_or_path)


def _distill_problems(spec: Spec) -> list[tuple[str, str]]:
    """`training.unit_distill_weight` > 0 needs earlier units to keep (`ncft.continual.distill`)."""
    if not spec.training.unit_distill_weight:
        return []
    row = method(spec.method)
    if not (row.selects and row.continual and not row.from_base):
        return [("training.unit_distill_weight", f"keeps earlier tasks' selected units, and "
                 f"method {spec.method} does not select neurons per task in one continuing "
                 "sequence; use method ncft or wncft, or set training.unit_distill_weight: 0")]
    if "attention" in spec.selection.modules and len(spec.selection.modules) == 1:
        return [("training.unit_distill_weight", "keeps FFN units' activations, and "
                 "selection.modules [attention] selects none; add an MLP role to "
                 "selection.modules or set training.unit_distill_weight: 0")]
    return []


def method_problems(method: str, num_tasks: int) -> list[tuple[str, str]]:
    """Check that a method gets the number of tasks it trains on."""
    if method in SINGLE_TASK_METHODS and num_tasks != 1:
        return [("method", f"{method!r} trains a single task but tasks has {num_tasks} entries; "
                 f"keep one task or use a continual method {list(CONTINUAL_METHODS)}")]
    if method in CONTINUAL_METHODS and num_tasks < 2:
        return [("method", f"{method!r} is continual and needs >= 2 tasks, tasks has "
                 f"{num_tasks}; add tasks or use {list(SINGLE_TASK_METHODS)}")]
    return []


def validate_spec(data: Any, base: str | Path | None = None, source: str | None = None) -> Spec:
    """Validate a spec mapping, resolving relative paths against `base` (default cwd).

    Raises:
        SpecError: Listing every problem at its YAML path.

    """
    context = {"base_dir": Path(base or Path.cwd()).absolute()}
    try:
        return Spec.model_validate(data, context=context)
    except ValidationError as exc:
        lines = problem_lines(exc, Spec)
        # Spec-level checks only run once every section is valid; report the method/task
        # count mismatch anyway, from the raw data, so one round of fixes is enough.
        if isinstance(data, dict) and isinstance(data.get("tasks"), list) and data["tasks"]:
            extra = method_problems(str(data.get("method")), len(data["tasks"]))
            lines += [f"{p}: {m}" for p, m in extra if not any(x.startswith(p) for x in lines)]
        raise SpecError(lines, source) from None


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Read a YAML spec, apply `a.b.c=value` overrides, and validate it.

    Args:
        path: The spec file; relative paths inside it are relative to its directory.
        overrides: `key.path=value` strings; values are parsed as YAML (numbers, bools,
            lists, null) and list items are addressed by index (`tasks.0.train_size=10`
            or `tasks[0].train_size=10`).

    Returns:
        The validated spec, with defaults filled and paths absolute.

    Raises:
        SpecError: For a missing file, bad YAML, a malformed override or an override of an
            unknown key, and for every validation problem (one line each).

    """
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"spec file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError([f"not valid YAML: {exc}"], path) from None
    if not isinstance(data, dict):
        raise SpecError([f"<top level>: expected a mapping of sections, got {type(data).__name__}"],
                        path)
    for text in overrides:
        try:
            apply_override(data, text, Spec)
        except ValueError as exc:
            raise SpecError([str(exc)]) from None
    return validate_spec(data, path.resolve().parent, str(path))


def dump_resolved(spec: Spec) -> str:
    """Render the spec as YAML after defaults and overrides; `load_spec` reads it back equal."""
    header = "# Resolved ncft spec: defaults and overrides applied, paths absolute.\n"
    body = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return header + body


__all__ = [
    "MODULES", "REPO_ROOT", "EngineSpec", "EvalSpec", "LoraSpec", "ModelSpec", "OloraSpec",
    "OutputSpec", "SelectionSpec", "Spec", "SpecError", "StudySpec", "TaskSpec",
    "TrainingSpec", "WncftSpec", "default_data_root", "dump_resolved", "load_spec",
    "describe_stages", "validate_spec",
]
