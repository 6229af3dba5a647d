"""The experiment spec: one typed tree from YAML to objects.

- `schema`: the whole `Spec`, cross-section checks, `load_spec` and `dump_resolved`.
- `sections`: one model per section (model, engine, selection, training, ...).
- `tasks`: a task's data source, format, labels and prompt.
- `plan`: the stages a run plans, in words, and which studies it runs.
- `overrides`: `key.sub=value` overrides and YAML-path error messages.
"""

from launcher.spec.schema import (
    EngineSpec,
    EvalSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    SelectionSpec,
    Spec,
    SpecError,
    TaskSpec,
    TrainingSpec,
    WncftSpec,
    default_data_root,
    describe_stages,
    dump_resolved,
    load_spec,
    validate_spec,
)

__all__ = [
    "EngineSpec", "EvalSpec", "LoraSpec", "ModelSpec", "OutputSpec", "SelectionSpec", "Spec",
    "SpecError", "TaskSpec", "TrainingSpec", "WncftSpec", "default_data_root", "dump_resolved",
    "load_spec", "describe_stages", "validate_spec",
]
