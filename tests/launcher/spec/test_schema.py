"""The experiment spec: shipped examples, malformed specs, overrides, round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from launcher.spec import (
    Spec,
    SpecError,
    default_data_root,
    describe_stages,
    dump_resolved,
    load_spec,
    validate_spec,
)
from launcher.spec.tasks import data_files

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
DATA_ROOT = default_data_root()

BASE = {
    "engine": {"backend": "fsdp2", "nproc_per_node": 1},
    "tasks": [
        {"source": {"type": "cl_benchmark", "name": "sst2"}, "train_size": 8},
        {"source": {"type": "cl_benchmark", "name": "agnews"}, "train_size": 8},
    ],
    "method": "ncft",
    "training": {"steps": 2},
    "output": {"dir": "run"},
}
DELETE = object()


@pytest.fixture(autouse=True)
def _needs_data():
    if DATA_ROOT is None or not (DATA_ROOT / "cl_benchmark").is_dir():
        pytest.fail("data root not found: no data/ in the repository, or a bad NCFT_DATA_ROOT")


def _patched(patch: dict) -> dict:
    """BASE with `dotted.key: value` entries set (DELETE removes); indices as `tasks.0`."""
    data = copy.deepcopy(BASE)
    for key, value in patch.items():
        *parents, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
        node = data
        for part in parents:
            node = node[part] if isinstance(node, list) else node.setdefault(part, {})
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return data


def _write(tmp_path: Path, data, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def json_files(tmp_path: Path) -> Path:
    folder = tmp_path / "mydata"
    folder.mkdir()
    for split in ("train", "test"):
        rows = [{"text": f"{split} {i}", "label": "yes" if i % 2 else "no"} for i in range(4)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


# --- shipped examples ---------------------------------------------------------------------


def test_examples_exist():
    assert EXAMPLES, "examples/*.yaml is empty"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_round_trips(path: Path, tmp_path: Path):
    spec = load_spec(path)
    assert describe_stages(spec)
    again = load_spec(_write(tmp_path, dump_resolved(spec), "resolved.yaml"))
    assert again == spec


# Leng & Xiong §6.1 / A.8: the orders of the real protocol's specs.
PROTOCOL_ORDERS = {
    "o1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "o2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "o3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "o4": ["mnli", "qqp", "rte", "amazon", "sst2", "dbpedia", "agnews", "yahoo"],
    "o5": ["amazon", "agnews", "yahoo", "qqp", "rte", "mnli", "dbpedia", "sst2"],
    "o6": ["agnews", "yahoo", "sst2", "rte", "qqp", "mnli", "dbpedia", "amazon"],
}


@pytest.mark.parametrize("order", sorted(PROTOCOL_ORDERS))
def test_protocol_specs_are_the_real_protocol(order):
    """Order, every shipped row for one epoch, full test sets, nothing fixed cut."""
    from launcher.run.task_data import load_task
    from ncft.continual.task import check_room
    from tests.support.smollm2 import smollm2_tokenizer

    spec = load_spec(REPO / "examples" / f"protocol_{order}_smollm2.yaml")
    assert [t.name for t in spec.tasks] == PROTOCOL_ORDERS[order]
    assert spec.model.name_or_path == "smollm2-135m-instruct"
    assert spec.training.epochs == 1 and spec.training.steps is None
    assert spec.eval.classification == "generate" and spec.eval.max_examples is None
    tasks = []
    for task in spec.tasks:
        files = data_files(task, spec.data_root)
        for split, size in (("train", task.train_size), ("test", task.eval_size)):
            rows = len(files[split].read_text(encoding="utf-8").strip().splitlines())
            assert size >= rows, f"{task.name} {split}: uses {size} of {rows} rows"
        tasks.append(load_task(task, spec.data_root))
    check_room(tasks, smollm2_tokenizer())  # max_length holds every fixed part


def test_plan_names_the_zero_shot_pass_and_fg_reference(tmp_path):
    plain = describe_stages(load_spec(REPO / "examples" / "tiny_ncft.yaml"))
    assert plain[-2].endswith("(accuracy matrix, CL, BWT, retention (no FG), forgetting)")
    spec = load_spec(REPO / "examples" / "tiny_ncft.yaml",
                     ["eval.zero_shot=true", f"eval.reference={tmp_path / 'per_task'}"])
    assert spec.eval.reference == tmp_path / "per_task"
    stages = describe_stages(spec)
    assert stages[0].startswith("zero-shot: evaluate the base model on every task")
    assert "FG (eq. 5, vs eval.reference)" in stages[-2]


def test_tiny_ncft_shape():
    spec = load_spec(REPO / "examples" / "tiny_ncft.yaml")
    assert [t.name for t in spec.tasks] == ["sst2", "agnews", "rte"]
    assert spec.engine.backend == "fsdp2" and spec.engine.world_size == 2
    assert all(t.train_size == 32 and t.eval_size == 16 for t in spec.tasks)
    assert spec.training.steps == 4 and spec.method == "ncft"
    stages = describe_stages(spec)
    assert stages[0].startswith("task 1/3 sst2: score neurons (grad_attribution, 10%")
    assert "4 steps on 2 ranks (fsdp2)" in stages[0]
    assert "eval after task 1 on all 3 tasks" in stages
    assert "checkpoint after task 1" in stages
    assert not any(s.startswith(("study:", "weight-movement", "NeFT utilization"))
                   for s in stages)  # attribution selection: NeFT's study is off by default
    forced = describe_stages(load_spec(REPO / "examples" / "tiny_ncft.yaml",
                                   ["study.neft_utilization=true"]))
    assert any(s.startswith("NeFT utilization (§6.1)") for s in forced)


def test_plan_names_study_mid_task_checkpoints_and_rank_shift():
    demo = describe_stages(load_spec(REPO / "examples" / "demo_smollm2.yaml",
                                 ["output.checkpoint_every=5"]))
    assert demo[0].startswith("study: tune every parameter 10 steps on all tasks")
    assert "checkpoint after task 2 (and every 5 steps within it, per-rank shards)" in demo
    neft = describe_stages(load_spec(REPO / "examples" / "neft_translation.yaml"))
    assert ("weight-movement rank shift: repeat the 20-step probe on each task's trained "
            "model") in neft
    off = describe_stages(load_spec(REPO / "examples" / "neft_translation.yaml",
                                ["study.weight_movement_rank_shift=false",
                                 "study.neft_utilization=false", "study.similarity=paper"]))
    assert not any(s.startswith(("weight-movement", "NeFT utilization")) for s in off)
    assert any(s.startswith("similarity (Leng & Xiong Fig. 3)") for s in off)
    demo = describe_stages(load_spec(REPO / "examples" / "demo_smollm2.yaml",
                                 ["study.deactivation_mode=weights",
                                  "study.finetune_matrix=true"]))
    assert "switch them off (weights)" in demo[0] and "fine-tuning matrix" in demo[1]


# --- malformed specs ----------------------------------------------------------------------

TRANSLATION = {"source": {"type": "translation"}, "name": "tr"}

MALFORMED = [
    # (case id, patch of BASE, expected YAML path in the message)
    ("dtype", {"model.dtype": "float64"}, "model.dtype"),
    ("fp16_not_deepspeed", {"model.dtype": "float16"}, "model.dtype"),
    ("ckpt_type", {"training.activation_checkpointing": "sometimes"},
     "training.activation_checkpointing"),
    ("name_type", {"model.name_or_path": 5}, "model.name_or_path"),
    ("model_extra", {"model.revision": "main"}, "model.revision"),
    ("backend", {"engine.backend": "horovod"}, "engine.backend"),
    ("single_2_procs", {"engine.backend": "single", "engine.nproc_per_node": 2},
     "engine.nproc_per_node"),
    ("single_2_nodes", {"engine.backend": "single", "engine.nnodes": 2}, "engine.nnodes"),
    ("nproc_0", {"engine.nproc_per_node": 0}, "engine.nproc_per_node"),
    ("nnodes_type", {"engine.nnodes": "two"}, "engine.nnodes"),
    ("ds_config", {"engine.ds_config": "zero9"}, "engine.ds_config"),
    ("ds_config_path", {"engine.ds_config": "nowhere/ds.json"}, "engine.ds_config"),
    ("engine_extra", {"engine.gpus": 2}, "engine.gpus"),
    ("top_extra", {"optimizer": {"lr": 1}}, "optimizer"),
    ("empty_tasks", {"tasks": []}, "tasks"),
    ("tasks_type", {"tasks": "sst2"}, "tasks"),
    ("duplicate_names", {"tasks.1.source.name": "sst2"}, "tasks[1].name"),
    ("bad_task_name", {"tasks.0.name": "a/b"}, "tasks[0].name"),
    ("cl_task", {"tasks.0.source.name": "imagenet"}, "tasks[0].source.name"),
    ("source_type", {"tasks.0.source.type": "csv"}, "tasks[0].source"),
    ("source_no_type", {"tasks.0.source.type": DELETE}, "tasks[0].source"),
    ("source_extra", {"tasks.0.source.split": "dev"}, "tasks[0].source.split"),
    ("task_extra", {"tasks.1.epochs": 3}, "tasks[1].epochs"),
    ("train_size_0", {"tasks.0.train_size": 0}, "tasks[0].train_size"),
    ("max_length_type", {"tasks.1.max_length": "long"}, "tasks[1].max_length"),
    ("cl_labels_wrong", {"tasks.0.labels": ["pos", "neg"]}, "tasks[0].labels"),
    ("cl_generation", {"tasks.0.format": "generation"}, "tasks[0].format"),
    ("prompt_no_text", {"tasks.0.prompt": "Answer:"}, "tasks[0].prompt"),
    ("prompt_text_twice", {"tasks.0.prompt": "{text} or {text}"}, "tasks[0].prompt"),
    ("prompt_placeholder", {"tasks.0.prompt": "{text} {answer}"}, "tasks[0].prompt"),
    ("prompt_braces", {"tasks.0.prompt": "{text} {"}, "tasks[0].prompt"),
    ("translation_labels", {"tasks": [TRANSLATION, {**TRANSLATION, "name": "t2",
                                                    "labels": ["a", "b"]}]}, "tasks[1].labels"),
    ("translation_classification", {"tasks.0": {**TRANSLATION, "format": "classification"}},
     "tasks[0].format"),
    ("generation_prompt_labels", {"tasks.0": {**TRANSLATION, "prompt": "{labels}: {text}"}},
     "tasks[0].prompt"),
    ("hf_no_labels", {"tasks.0.source": {"type": "hf", "path": "glue"}, "tasks.0.name": "g"},
     "tasks[0].labels"),
    ("hf_no_path", {"tasks.0.source": {"type": "hf"}, "tasks.0.name": "g"},
     "tasks[0].source.path"),
    ("hf_no_name", {"tasks.0.source": {"type": "hf", "path": "glue"}, "tasks.0.labels": ["a", "b"]},
     "tasks[0].name"),
    ("json_missing_file", {"tasks.0.source": {"type": "json", "train": "no/train.jsonl",
                                              "test": "no/test.jsonl"}, "tasks.0.name": "j"},
     "tasks[0].source.train"),
    ("fraction_0", {"selection.fraction": 0}, "selection.fraction"),
    ("fraction_1.5", {"selection.fraction": 1.5}, "selection.fraction"),
    ("fraction_and_count", {"selection.fraction": 0.1, "selection.count": 10},
     "selection.fraction"),
    ("neither_fraction_nor_count", {"selection.fraction": None}, "selection.fraction"),
    ("count_0", {"selection.count": 0}, "selection.count"),
    ("scorer", {"selection.scorer": "magic"}, "selection.scorer"),
    ("module", {"selection.modules": ["gate", "mlp"]}, "selection.modules[1]"),
    ("modules_str", {"selection.modules": "gate"}, "selection.modules"),
    ("attention_neuron", {"selection.modules": ["attention"]}, "selection.modules"),
    ("selection_extra", {"selection.topk": 5}, "selection.topk"),
    ("positions", {"selection.positions": "prompt"}, "selection.positions"),
    ("per_layer_type", {"selection.per_layer": "maybe"}, "selection.per_layer"),
    ("lr_negative", {"training.lr": -1e-4}, "training.lr"),
    ("lr_type", {"training.lr": "fast"}, "training.lr"),
    ("steps_and_epochs", {"training.epochs": 1}, "training.steps"),
    ("steps_0", {"training.steps": 0}, "training.steps"),
    ("weight_decay", {"training.weight_decay": -0.1}, "training.weight_decay"),
    ("betas", {"training.betas": [0.9, 1.0]}, "training.betas"),
    ("betas_len", {"training.betas": [0.9]}, "training.betas[1]"),
    ("warmup", {"training.warmup_steps": 5}, "training.warmup_steps"),
    ("method", {"method": "magic"}, "method"),
    ("method_missing", {"method": DELETE}, "method"),
    ("neurons_2_tasks", {"method": "neurons"}, "method"),
    ("lora_2_tasks", {"method": "lora"}, "method"),
    ("ncft_1_task", {"tasks": [{"source": {"type": "cl_benchmark", "name": "sst2"}}]}, "method"),
    ("lora_dropout", {"lora.dropout": 1.0}, "lora.dropout"),
    ("lora_extra", {"lora.rank": 4}, "lora.rank"),
    ("wncft_temperature", {"wncft.temperature": 0}, "wncft.temperature"),
    ("wncft_query", {"wncft.query": "batch"}, "wncft.query"),
    ("eval_classification", {"eval.classification": "argmax"}, "eval.classification"),
    ("calibration_value", {"eval.calibration": "platt"}, "eval.calibration"),
    ("calibration_generate", {"eval.calibration": "content_free",
                              "eval.classification": "generate"}, "eval.calibration"),
    ("calibration_example_routing", {"eval.calibration": "content_free", "method": "wncft",
                                     "wncft.query": "example"}, "eval.calibration"),
    ("olora_lambda", {"method": "olora", "olora.lambda_orth": -1}, "olora.lambda_orth"),
    ("fraction_of_per_layer", {"selection.fraction_of": "parameters"}, "selection.per_layer"),
    ("fraction_of_count", {"selection.fraction_of": "parameters", "selection.per_layer": False,
                           "selection.count": 4}, "selection.fraction_of"),
    ("model_architecture", {"model.architecture": "llama"}, "model.architecture"),
    ("model_gguf_file", {"model.gguf_file": "m.gguf"}, "model.gguf_file"),
    ("eval_metric", {"eval.metrics": ["accuracy"]}, "eval.metrics[0]"),
    ("eval_max_examples", {"eval.max_examples": 0}, "eval.max_examples"),
    ("output_missing", {"output": DELETE}, "output"),
    ("output_dir_missing", {"output.dir": DELETE}, "output.dir"),
    ("resume_overwrite", {"output.resume": True, "output.overwrite": True}, "output.resume"),
    ("checkpoint_every", {"output.checkpoint_every": -1}, "output.checkpoint_every"),
    ("output_extra", {"output.path": "x"}, "output.path"),
]


@pytest.mark.parametrize(("patch", "where"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_spec_is_rejected_at_its_path(tmp_path: Path, patch: dict, where: str):
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, _patched(patch)))
    assert any(p.startswith(f"{where}:") for p in info.value.problems), str(info.value)
    assert where in str(info.value)


def test_malformed_table_is_large_enough():
    assert len(MALFORMED) >= 30


def test_missing_data_file_names_the_file(tmp_path: Path):
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, _patched({"data_root": str(empty)})))
    msg = str(info.value)
    assert "tasks[0].source: file" in msg and "cl_benchmark/sst2/train.jsonl" in msg
    assert "tasks[1].source: file" in msg  # every task is reported, not just the first


def test_every_problem_is_listed(tmp_path: Path):
    patch = {"engine.backend": "horovod", "training.lr": -1, "selection.fraction": 2}
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, _patched(patch)))
    paths = [p.split(":")[0] for p in info.value.problems]
    assert {"engine.backend", "training.lr", "selection.fraction"} <= set(paths)


def test_unknown_key_lists_valid_keys(tmp_path: Path):
    with pytest.raises(SpecError, match=r"training\.lrr: unknown key; valid keys here: .*'lr'"):
        load_spec(_write(tmp_path, _patched({"training.lrr": 1})))


def test_single_task_method_error_names_tasks(tmp_path: Path):
    with pytest.raises(SpecError, match=r"method: 'neurons' trains a single task but tasks has 2"):
        load_spec(_write(tmp_path, _patched({"method": "neurons"})))


@pytest.mark.parametrize("method", ["seqft", "seqlora"])
def test_sparse_delta_refused_for_full_and_lora_methods(tmp_path: Path, method: str):
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError, match=r"training\.update: sparse_delta .* set training\.update: "
                       "masked"):
        load_spec(path, [f"method={method}", "training.update=sparse_delta"])


def test_sparse_delta_accepted_for_neuron_methods(tmp_path: Path):
    path = _write(tmp_path, BASE)
    assert load_spec(path).training.update == "masked"
    spec = load_spec(path, ["method=wncft", "training.update=sparse_delta"])
    assert spec.training.update == "sparse_delta"
    with pytest.raises(SpecError, match="training.update"):
        load_spec(path, ["training.update=dense"])


def test_unit_distill_weight_off_by_default_and_checked(tmp_path: Path):
    path = _write(tmp_path, BASE)
    assert load_spec(path).training.unit_distill_weight == 0.0
    spec = load_spec(path, ["training.unit_distill_weight=2.5", "method=wncft"])
    assert spec.loop_config().training.unit_distill_weight == 2.5
    stages = "\n".join(describe_stages(spec))
    assert stages.count("unit_distill_weight 2.5, ncft's own") == 1  # not the first task
    with pytest.raises(SpecError, match=r"training\.unit_distill_weight: .*greater than or equal"):
        load_spec(path, ["training.unit_distill_weight=-0.1"])
    with pytest.raises(SpecError, match=r"training\.unit_distill_weight: .*FFN units"):
        load_spec(path, ["training.unit_distill_weight=1", "selection.modules=[attention]",
                         "selection.unit=row"])


@pytest.mark.parametrize("method", ["seqft", "olora", "per_task"])
def test_unit_distill_refused_without_per_task_neurons(tmp_path: Path, method: str):
    path = _write(tmp_path, BASE)
    with pytest.raises(SpecError, match=rf"training\.unit_distill_weight: .*method {method} does "
                       r"not select .*set training\.unit_distill_weight: 0"):
        load_spec(path, [f"method={method}", "training.unit_distill_weight=1"])
    assert load_spec(path, [f"method={method}"]).training.unit_distill_weight == 0.0


# --- files and YAML -----------------------------------------------------------------------


def test_missing_spec_file(tmp_path: Path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["tasks: [\n", "method: ncft\n\tbad: 1\n", "- a\n- b\n", ""])
def test_bad_yaml(tmp_path: Path, text: str):
    with pytest.raises(SpecError):
        load_spec(_write(tmp_path, text))


# --- overrides ----------------------------------------------------------------------------


def test_overrides_apply(tmp_path: Path):
    path = _write(tmp_path, BASE)
    spec = load_spec(path, ["training.lr=0.5", "tasks.0.train_size=3",
                            "engine.nproc_per_node=2", "selection.modules=[gate, down]",
                            "tasks[1].eval_size=7", "output.tensorboard=true"])
    assert spec.training.lr == 0.5
    assert spec.tasks[0].train_size == 3 and spec.tasks[1].eval_size == 7
    assert spec.engine.world_size == 2
    assert spec.selection.modules == ["gate", "down"]
    assert spec.output.tensorboard is True


def test_override_count_needs_fraction_null(tmp_path: Path):
    path = _write(tmp_path, _patched({"selection.fraction": 0.1}))
    with pytest.raises(SpecError, match="selection.fraction"):
        load_spec(path, ["selection.count=10"])
    spec = load_spec(path, ["selection.count=10", "selection.fraction=null"])
    assert spec.selection.count == 10 and spec.selection.fraction is None


def test_count_alone_replaces_default_fraction(tmp_path: Path):
    spec = load_spec(_write(tmp_path, _patched({"selection.count": 50})))
    assert spec.selection.count == 50 and spec.selection.fraction is None


def test_epochs_alone_replace_default_steps(tmp_path: Path):
    spec = load_spec(_write(tmp_path, _patched({"training": {"epochs": 2}})))
    assert spec.training.epochs == 2 and spec.training.steps is None


def test_override_creates_absent_section(tmp_path: Path):
    spec = load_spec(_write(tmp_path, BASE), ["lora.r=4", "tasks.0.source.name=rte"])
    assert spec.lora.r == 4 and spec.tasks[0].name == "rte"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.lr", "expected KEY=VALUE"),
        ("=3", "empty key segment"),
        ("training.lrr=1", "unknown key 'lrr' in training"),
        ("foo=1", "unknown key 'foo' in the top level"),
        ("foo.bar=1", "unknown key 'foo'"),
        ("tasks.5.train_size=1", "tasks is a list of 2"),
        ("tasks.x.train_size=1", "tasks is a list of 2"),
        ("tasks.0.source.split=dev", "unknown key 'split' in tasks[0].source"),
        ("method.x=1", "method is a str"),
        ("training.0=1", "unknown key 0 in training"),
        ("training.lr=[1", "override 'training.lr=[1'"),
    ],
)
def test_bad_override(tmp_path: Path, override: str, expected: str):
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, BASE), [override])
    assert expected in str(info.value)


def test_override_value_is_validated(tmp_path: Path):
    with pytest.raises(SpecError, match="engine.nproc_per_node"):
        load_spec(_write(tmp_path, _patched({"engine.backend": "single"})),
                  ["engine.nproc_per_node=2"])


# --- defaults, paths, round trip ----------------------------------------------------------


def test_defaults(tmp_path: Path):
    spec = load_spec(_write(tmp_path, BASE))
    assert spec.model.name_or_path == "smollm2-135m-instruct" and spec.model.dtype == "float32"
    assert spec.engine.ds_config == "zero3"
    assert spec.data_root == DATA_ROOT
    assert spec.tasks[0].labels == ["Good", "Bad"] and spec.tasks[0].format == "classification"
    assert spec.tasks[1].eval_size == 200 and spec.tasks[1].max_length == 256
    assert spec.selection.modules == ["gate", "up", "down"] and spec.selection.unit == "neuron"
    assert spec.selection.seed == spec.training.seed == 0
    assert spec.training.grad_clip == 1.0 and spec.training.epochs is None
    assert spec.training.activation_checkpointing is False
    assert spec.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.output.dir == tmp_path / "run"  # relative to the spec file


def test_default_prompts(tmp_path: Path):
    data = _patched({"tasks.1.source.name": "copa"})
    spec = load_spec(_write(tmp_path, data))
    sst2, copa = spec.tasks
    assert sst2.render("Text: fine") == (
        "What is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: Good, Bad \nText: fine\nAnswer:"
    )
    assert copa.render("Which?") == "Which?\nAnswer:"


def test_default_data_root_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("NCFT_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("NCFT_DATA_ROOT")
    assert default_data_root() == REPO / "data"


def test_json_source_relative_to_spec(tmp_path: Path, json_files: Path):
    task = {"name": "mine", "labels": ["no", "yes"],
            "source": {"type": "json", "train": "mydata/train.jsonl", "test": "mydata/test.jsonl"}}
    spec = load_spec(_write(tmp_path, _patched({"tasks.0": task})))
    assert spec.tasks[0].source.train == json_files / "train.jsonl"
    assert "Option: no, yes" in spec.tasks[0].render("x")


def test_json_generation_without_labels(tmp_path: Path, json_files: Path):
    task = {"name": "gen", "format": "generation",
            "source": {"type": "json", "train": str(json_files / "train.jsonl"),
                       "test": str(json_files / "test.jsonl"), "label_field": "label"}}
    spec = load_spec(_write(tmp_path, _patched({"tasks.0": task})))
    assert spec.tasks[0].labels is None and spec.tasks[0].prompt == "{text}\nAnswer:"


def test_json_classification_without_labels(tmp_path: Path, json_files: Path):
    task = {"name": "mine", "source": {"type": "json", "train": "mydata/train.jsonl",
                                       "test": "mydata/test.jsonl"}}
    with pytest.raises(SpecError, match=r"tasks\[0\]\.labels: classification on a json source"):
        load_spec(_write(tmp_path, _patched({"tasks.0": task})))


def test_ds_config_path_relative_to_spec(tmp_path: Path):
    shipped = (REPO / "ds_configs" / "zero3.json").read_text()
    (tmp_path / "my_ds.json").write_text(shipped)
    spec = load_spec(_write(tmp_path, _patched({"engine.backend": "deepspeed",
                                                "engine.ds_config": "my_ds.json"})))
    assert spec.engine.ds_config == str(tmp_path / "my_ds.json")


def test_dump_resolved_round_trip_from_elsewhere(tmp_path: Path, json_files: Path):
    task = {"name": "mine", "labels": ["no", "yes"],
            "source": {"type": "json", "train": "mydata/train.jsonl", "test": "mydata/test.jsonl"}}
    spec = load_spec(_write(tmp_path, _patched({"tasks.1": task, "selection.count": 7})),
                     ["training.lr=0.5"])
    other = tmp_path / "elsewhere"
    other.mkdir()
    again = load_spec(_write(other, dump_resolved(spec)))
    assert again == spec
    assert dump_resolved(again) == dump_resolved(spec)


def test_validate_spec_from_dict(tmp_path: Path):
    spec = validate_spec(BASE, base=tmp_path)
    assert isinstance(spec, Spec) and spec.output.dir == tmp_path / "run"
    with pytest.raises(SpecError, match="method"):
        validate_spec({**BASE, "method": "x"}, base=tmp_path)


def test_describe_stages_methods(tmp_path: Path):
    single = load_spec(_write(tmp_path, _patched({"method": "lora", "tasks": BASE["tasks"][:1]})))
    assert single.engine.world_size == 1
    assert describe_stages(single)[0].startswith("task 1/1 sst2: train LoRA r=8 on q_proj/v_proj")
    assert describe_stages(single)[1] == "eval on sst2"
    cont = load_spec(_write(tmp_path, _patched({"method": "wncft", "selection.count": 9,
                                                "engine.nproc_per_node": 2})))
    stages = describe_stages(cont)
    assert "top 9 per layer" in stages[0] and "on 2 ranks (fsdp2)" in stages[0]
    assert any("mixing earlier tasks' neurons" in s for s in stages)


def test_method_mismatch_reported_beside_section_errors(tmp_path: Path):
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, _patched({"method": "full", "training.lr": 0})))
    paths = {p.split(":")[0] for p in info.value.problems}
    assert paths == {"training.lr", "method"}


def test_standard_cl_o1_methods_in_its_header_are_valid():
    path = REPO / "examples" / "standard_cl_o1.yaml"
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("#   ncft run")]
    methods = []
    for line in lines:
        overrides = line.split("#", 2)[1].split()[3:]  # after `ncft run SPEC`
        methods.append(load_spec(path, overrides).method)
    assert sorted(methods) == ["ncft", "per_task", "seqft", "seqlora", "wncft"]


def test_reversed_fraction_goes_with_neft_plus_reversed():
    spec = load_spec(REPO / "examples" / "neft_translation.yaml",
                     ["selection.scorer=neft_plus_reversed", "selection.reversed_fraction=0.03"])
    assert spec.selection.reversed_fraction == 0.03
    for bad in (["selection.scorer=neft_plus_reversed"], ["selection.reversed_fraction=0.1"]):
        with pytest.raises(SpecError, match="reversed_fraction"):
            load_spec(REPO / "examples" / "neft_translation.yaml", bad)


def test_paper_similarity_needs_a_method_without_lora():
    with pytest.raises(SpecError, match="study.similarity"):
        load_spec(REPO / "examples" / "demo_smollm2.yaml",
                  ["method=seqlora", "study.similarity=paper"])


def test_finetune_matrix_needs_the_deactivation_study():
    with pytest.raises(SpecError, match="study.finetune_matrix"):
        load_spec(REPO / "examples" / "demo_smollm2.yaml",
                  ["study.deactivation=false", "study.finetune_matrix=true"])


def test_methods_table_drives_allowed_values_and_plan(tmp_path: Path):
    from ncft.continual.methods import CONTINUAL_METHODS, METHODS

    assert "olora" in CONTINUAL_METHODS and set(METHODS) == set(
        Spec.model_fields["method"].annotation.__args__)
    spec = load_spec(_write(tmp_path, _patched({"method": "olora"})))  # fsdp2: any engine
    plan = "\n".join(describe_stages(spec))
    assert "train a new LoRA r=8" in plan and "orthogonality weight 0.5" in plan
    spec = load_spec(_write(tmp_path, _patched({"method": "wncft", "wncft.query": "example"})))
    assert "query: each example's own prompt vector" in "\n".join(describe_stages(spec))
    with pytest.raises(SpecError, match="inferred from the model config"):
        load_spec(_write(tmp_path, _patched({"model.architecture": "llama"})))
