"""Every spec option reaches the code that reads it (`to_config()`, one definition each).

Each field of every section is changed on its own; the test finds the changed value in
the continual loop's config (`Spec.loop_config`), the selection pipeline's
(`Spec.select_config`), the studies' (`StudySpec.to_config`) or the engine's optimizer
config (`optim_config`). A field that
no consumer receives, or that a new section adds without a line below, fails here.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from pydantic import BaseModel

from launcher.run.backend import optim_config
from launcher.spec import Spec, validate_spec

BASE = {
    "tasks": [{"source": {"type": "cl_benchmark", "name": "sst2"}, "train_size": 8},
              {"source": {"type": "cl_benchmark", "name": "agnews"}, "train_size": 8}],
    "method": "wncft",
    "training": {"steps": 4},
    "output": {"dir": "run"},
}

# One valid change per field: {field: value} or, where other fields must move with it,
# {field: (value, {other: value})}. The field's own value is what must arrive.
CHANGES = {
    "selection": {
        "scorer": "weight_cosine", "fraction": 0.2, "per_layer": False,
        "count": (3, {"fraction": None}), "modules": ["up"], "unit": "row",
        "positions": "all", "num_examples": 5, "batch_size": 3, "cosine_steps": 7,
        "union_with_previous": True, "exclude_previous": True, "seed": 11,
        "reversed_fraction": (0.1, {"scorer": "neft_plus_reversed"}),
        "fraction_of": ("parameters", {"per_layer": False}),
    },
    "training": {
        "lr": 3e-3, "steps": 6, "epochs": (2, {"steps": None}), "micro_batch_size": 3,
        "grad_accum": 2, "weight_decay": 0.1, "grad_clip": 0.5, "seed": 5,
        "warmup_steps": 2, "betas": [0.8, 0.9], "eps": 1e-6,
        "activation_checkpointing": True, "update": "sparse_delta",
        "on_nonfinite": "skip_step", "max_skipped_steps": (3, {"on_nonfinite": "skip_step"}),
        "unit_distill_weight": 0.5,
    },
    "eval": {
        "batch_size": 3, "max_examples": 7, "max_new_tokens": 9, "classification": "generate",
        "calibration": "content_free", "metrics": ["bleu"], "tasks": "seen",
        "zero_shot": True,
    },
    "wncft": {"num_samples": 5, "temperature": 0.5, "query": "example"},
    "olora": {"lambda_orth": 0.25, "lambda_l2": 0.125},
    "lora": {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj"]},
    "model": {"name_or_path": "tiny-random-llama", "dtype": "bfloat16"},
    "study": {
        "deactivation": True, "deactivation_mode": "weights",
        "finetune_matrix": (True, {"deactivation": True}), "finetune_steps": 7,
        "finetune_lr": 0.01, "eval_examples": 5, "neft_utilization": True,
        "neft_strong_fraction": 0.2, "weight_movement_rank_shift": False, "similarity": "both",
        "task_metric": False,
    },
    "output": {"log_every": 3},
}

# Read elsewhere, each by one owner: the engine and processes (launcher.run.spawn,
# launcher.engines), the run directory and logs (launcher.run.rundir,
# launcher.run.backend), the tasks' data (launcher.run.task_data), the FG reference run
# (launcher.run.experiment.fg_reference).
ELSEWHERE = {
    "engine": "all", "tasks": "all", "data_root": "all", "eval": {"reference"},
    "output": {"dir", "resume", "overwrite", "checkpoint_every", "tensorboard", "report"},
}
# Where a field arrives under another name than its own.
RENAMED = {("output", "log_every"): ("loop", "log_every"),
           ("model", "name_or_path"): ("select", "model_id"),
           ("model", "dtype"): ("optim", "compute_dtype")}
DTYPES = {"bfloat16": torch.bfloat16}


def _spec(section: str, field: str) -> Spec:
    data = copy.deepcopy(BASE)
    change = CHANGES[section][field]
    value, companions = change if isinstance(change, tuple) else (change, {})
    data.setdefault(section, {}).update({field: value, **companions})
    if (section, field) == ("eval", "calibration"):
        data["wncft"] = {"query": "task"}  # content_free needs one prior per task
    return validate_spec(data)


def _arrived(spec: Spec, section: str, field: str) -> list:
    """The values `field` takes in every consumer config that has a field of its name."""
    consumers = {"loop": spec.loop_config(), "select": spec.select_config(),
                 "optim": optim_config(spec), "study": spec.study.to_config()}
    if (section, field) in RENAMED:
        where, name = RENAMED[(section, field)]
        return [getattr(consumers[where], name)]
    found = []
    loop_section = getattr(consumers["loop"], section, None)
    if dataclasses.is_dataclass(loop_section) and hasattr(loop_section, field):
        found.append(getattr(loop_section, field))
    if section in ("selection", "study"):
        found.append(getattr(consumers["select" if section == "selection" else section],
                             field, _MISSING))
    if section == "training" and hasattr(consumers["optim"], field):
        found.append(getattr(consumers["optim"], field))
    return [v for v in found if v is not _MISSING]


_MISSING = object()
FIELDS = [(s, f) for s, fields in CHANGES.items() for f in fields]


def _expected(section: str, field: str, value):
    if (section, field) == ("model", "dtype"):
        return DTYPES[value]
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize(("section", "field"), FIELDS, ids=[f"{s}.{f}" for s, f in FIELDS])
def test_each_option_reaches_its_consumer(section, field):
    change = CHANGES[section][field]
    value = change[0] if isinstance(change, tuple) else change
    changed = _arrived(_spec(section, field), section, field)
    base = _arrived(validate_spec(copy.deepcopy(BASE)), section, field)
    assert changed, f"{section}.{field} reaches no consumer config (dropped from to_config?)"
    assert all(v == _expected(section, field, value) for v in changed), (section, field, changed)
    assert changed != base, f"{section}.{field}: the change equals the default; pick another"


def test_method_reaches_the_loop():
    data = {**copy.deepcopy(BASE), "method": "seqft"}
    assert validate_spec(data).loop_config().method == "seqft"


def test_every_spec_field_is_listed():
    """A new option fails here until it has a consumer above (or an owner elsewhere)."""
    unlisted = []
    for section, info in Spec.model_fields.items():
        if ELSEWHERE.get(section) == "all" or section == "method":
            continue
        annotation = info.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            unlisted.append(section)
            continue
        for field in annotation.model_fields:
            if field not in CHANGES.get(section, {}) and field not in ELSEWHERE.get(section, ()):
                unlisted.append(f"{section}.{field}")
    assert not unlisted, f"spec fields with no consumer in this test: {unlisted}"
