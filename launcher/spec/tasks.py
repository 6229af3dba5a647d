r"""Tasks of the experiment spec: their data sources, formats, labels and prompts.

A task is a data `source` (a discriminated union on `type`), a `format`
(classification or generation), its label set and a prompt template. Defaults that
depend on the source (task name, format, prompt) are filled in when a task is
validated, so the resolved spec shows exactly what a run used.

Prompts follow O-LoRA (`src/uie_dataset_lora.py`): for a cl_benchmark task the model
input is `instruction + "Option: " + ", ".join(labels) + " \n" + text + "\nAnswer:"`,
with the zero-shot instruction of the task's type copied verbatim from O-LoRA's
`configs/instruction_config.json` (kept as a table here rather than read from
`instructions.json`, so a data root without that file still validates). COPA's text
already holds the question and options, so its prompt is `text + "\nAnswer:"`.
A template is a `str.format` string over `{text}` (exactly once) and `{labels}` (the
label list joined by ", "); write `{{` and `}}` for literal braces. Everything but
`{text}` is the prompt's fixed part: a prompt that is too long loses the end of its
text, never its instruction, options or `Answer:` cue (`ncft.data.prompt.fit_prompt`).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ncft.continual.methods import (  # noqa: F401  (re-exported: the spec's allowed values)
    CONTINUAL_METHODS,
    SINGLE_TASK_METHODS,
    method,
)
from ncft.data.prompt import Prompt, render

CL_BENCHMARK_TASKS = (
    "agnews", "amazon", "dbpedia", "yahoo", "yelp", "imdb", "sst2", "mnli", "rte", "cb",
    "qqp", "boolq", "copa", "multirc", "wic",
)

# O-LoRA task type of each cl_benchmark task (its CL_Benchmark/<type>/ directory).
CL_TASK_TYPE = {
    "agnews": "TC", "dbpedia": "TC", "yahoo": "TC",
    "amazon": "SC", "yelp": "SC", "imdb": "SC", "sst2": "SC",
    "mnli": "NLI", "rte": "NLI", "cb": "NLI",
    "qqp": "QQP", "boolq": "BoolQA", "multirc": "MultiRC", "wic": "WiC", "copa": "COPA",
}

# Verbatim zero-shot instructions of O-LoRA configs/instruction_config.json (no COPA entry).
INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? "
    "Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer "
    "true or false? Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in "
    "both sentence? Choose one from the option.\n",
}

OPTION_SUFFIX = "Option: {labels} \n{text}\nAnswer:"
GENERIC_INSTRUCTION = "Choose one from the option.\n"
TRANSLATION_PROMPT = "Translate the following English text to Spanish.\n{text}\nSpanish:"
GENERATION_PROMPT = "{text}\nAnswer:"


SOURCE_TYPES = ("cl_benchmark", "translation", "json", "hf")
TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Problems(ValueError):
    """Several user errors at once, each at a YAML path relative to the failing model.

    Raised from model validators so that `launcher.spec` can report
    `tasks[1].labels: ...` rather than only the enclosing section.
    """

    def __init__(self, items: list[tuple[str, str]]):
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in items))
        self.items = items


def base_dir(info: ValidationInfo) -> Path:
    """Return the directory relative paths resolve against (the spec file's, else cwd)."""
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def absolute(path: Path, base: Path) -> Path:
    """`path` made absolute against `base`, with `~` expanded and `..` folded."""
    path = path.expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(base / path))


class ClBenchmarkSource(BaseModel):
    """A task of the shared continual-learning benchmark, under `<data_root>/cl_benchmark/`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["cl_benchmark"] = Field(description="Source kind tag.")
    name: Literal[CL_BENCHMARK_TASKS] = Field(  # type: ignore[valid-type]
        description="Benchmark task; files `<data_root>/cl_benchmark/<name>/{train,test}.jsonl` "
        '(lines `{"text", "label"}`) and `labels.json`.'
    )


class TranslationSource(BaseModel):
    """The shared parallel corpus `<data_root>/translation_<pair>/` (generation)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["translation"] = Field(description="Source kind tag.")
    pair: Literal["en_es"] = Field(
        "en_es",
        description='Language pair; files `{train,test}.jsonl` of `{"id","source","target"}`.',
    )


class JsonSource(BaseModel):
    """Explicit JSON-lines files; relative paths are relative to the spec file's directory."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json"] = Field(description="Source kind tag.")
    train: Path = Field(description="Training split, one JSON object per line.")
    test: Path = Field(description="Evaluation split, same format.")
    text_field: str = Field("text", description="Key of the input text in each line.")
    label_field: str = Field(
        "label", description="Key of the label (classification) or target text (generation)."
    )

    @field_validator("train", "test")
    @classmethod
    def _exists(cls, path: Path, info: ValidationInfo) -> Path:
        path = absolute(path, base_dir(info))
        if not path.is_file():
            raise ValueError(f"file {path} does not exist")
        return path


class HfSource(BaseModel):
    """A `datasets` dataset (hub id, local script or directory); not checked at validation."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["hf"] = Field(description="Source kind tag.")
    path: str = Field(description="`datasets.load_dataset` path: hub id, script or directory.")
    name: str | None = Field(None, description="Dataset configuration name.")
    train_split: str = Field("train", description="Split used for training and scoring.")
    test_split: str = Field("test", description="Split used for evaluation.")
    text_field: str = Field("text", description="Column holding the input text.")
    label_field: str = Field(
        "label", description="Column holding the label (classification) or target (generation)."
    )


Source = Annotated[
    ClBenchmarkSource | TranslationSource | JsonSource | HfSource, Field(discriminator="type")
]


class TaskSpec(BaseModel):
    """One task of the sequence: data, format, labels, prompt and sizes."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None,
        pattern=TASK_NAME_PATTERN,
        description="Unique task name (used in file names); defaults to the cl_benchmark name "
        "or `translation_<pair>`, required for json and hf sources.",
    )
    source: Source = Field(description="Where the data comes from; `type` picks the kind.")
    format: Literal["classification", "generation"] | None = Field(
        None,
        description="classification (answer constrained to `labels`) or generation; defaults "
        "to generation for translation and classification otherwise.",
    )
    labels: list[str] | None = Field(
        None,
        description="Label strings, in prompt order. Classification only; cl_benchmark reads "
        "`labels.json` when omitted, json/hf classification must give them.",
    )
    prompt: str | None = Field(
        None,
        description="`str.format` template over `{text}` (required) and `{labels}` (labels "
        "joined by ', '); defaults to O-LoRA's instruction format (see module docstring).",
    )
    train_size: int = Field(1000, gt=0, description="Training examples used (at most).")
    eval_size: int = Field(200, gt=0, description="Evaluation examples used (at most).")
    max_length: int = Field(256, gt=0, description="Token limit of prompt + answer.")
    eval_split: Literal["test", "heldout"] = Field(
        "test",
        description="Evaluate on the test split, or on `heldout`: the LAST `eval_size` rows "
        "of the training split, never among the first `train_size` used for training (to "
        "choose a learning rate without touching the test split).",
    )

    @model_validator(mode="after")
    def _fill_and_check(self) -> TaskSpec:
        problems: list[tuple[str, str]] = []
        kind = self.source.type
        if self.name is None:
            if isinstance(self.source, ClBenchmarkSource):
                self.name = self.source.name
            elif isinstance(self.source, TranslationSource):
                self.name = f"translation_{self.source.pair}"
            else:
                problems.append(("name", f"required for a {kind} source"))
        if self.format is None:
            self.format = "generation" if kind == "translation" else "classification"
        if kind == "translation" and self.format != "generation":
            problems.append(("format", "translation is generation; set format: generation"))
        if kind == "cl_benchmark" and self.format != "classification":
            problems.append(("format", "cl_benchmark tasks are classification"))
        problems += self._check_labels()
        if self.prompt is None:
            self.prompt = default_prompt(self.source, self.format)
        problems += check_prompt(self.prompt, self.format)
        if problems:
            raise Problems(problems)
        return self

    def _check_labels(self) -> list[tuple[str, str]]:
        if self.format == "generation":
            if self.labels is not None:
                return [("labels", "a generation task has no labels; remove them")]
            return []
        if self.labels is None:
            if self.source.type in ("json", "hf"):
                return [("labels", f"classification on a {self.source.type} source needs the "
                         "label list, e.g. labels: [negative, positive]")]
            return []  # cl_benchmark: read from labels.json once data_root is known
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            return [("labels", f"need at least 2 distinct labels, got {self.labels}")]
        return []

    def render(self, text: str) -> Prompt:
        """Build the model input for one example: the prompt with `text` and labels filled.

        The result keeps its parts apart (`ncft.data.prompt.Prompt`), so truncation
        cuts `text` only and never the instruction, the options or the cue.
        """
        return render(self.prompt, text, labels=", ".join(self.labels or []))


def default_prompt(source: BaseModel, fmt: str) -> str:
    """Return the O-LoRA-style template a task gets when its spec gives no `prompt`."""
    if isinstance(source, ClBenchmarkSource):
        kind = CL_TASK_TYPE[source.name]
        return GENERATION_PROMPT if kind == "COPA" else INSTRUCTIONS[kind] + OPTION_SUFFIX
    if isinstance(source, TranslationSource):
        return TRANSLATION_PROMPT
    return GENERIC_INSTRUCTION + OPTION_SUFFIX if fmt == "classification" else GENERATION_PROMPT


def check_prompt(prompt: str, fmt: str) -> list[tuple[str, str]]:
    """Problems with a template: bad braces, unknown placeholders, `{labels}` in generation."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
    except ValueError as exc:
        return [("prompt", f"not a valid template ({exc}); write {{{{ and }}}} for braces")]
    allowed = {"text", "labels"} if fmt == "classification" else {"text"}
    problems = []
    texts = sum(1 for _, f, _, _ in string.Formatter().parse(prompt) if f == "text")
    if texts != 1:
        problems.append(("prompt", "must contain the {text} placeholder exactly once (the "
                         "only part truncation may cut)"))
    unknown = sorted(fields - allowed)
    if unknown:
        problems.append(("prompt", f"unknown placeholders {unknown}; allowed: {sorted(allowed)}"))
    return problems


def data_files(task: TaskSpec, data_root: Path | None) -> dict[str, Path]:
    """Return the files a task reads (train, test, and labels for cl_benchmark); {} for hf."""
    source = task.source
    if isinstance(source, JsonSource):
        return {"train": source.train, "test": source.test}
    if isinstance(source, HfSource) or data_root is None:
        return {}
    if isinstance(source, ClBenchmarkSource):
        folder = data_root / "cl_benchmark" / source.name
        return {"train": folder / "train.jsonl", "test": folder / "test.jsonl",
                "labels": folder / "labels.json"}
    folder = data_root / f"translation_{source.pair}"
    return {"train": folder / "train.jsonl", "test": folder / "test.jsonl"}


def resolve_task_data(task: TaskSpec, data_root: Path | None) -> list[tuple[str, str]]:
    """Check a data-root task's files exist and fill cl_benchmark labels from `labels.json`.

    Returns:
        Problems as (path relative to the task, message); empty when all is well.

    """
    if task.source.type not in ("cl_benchmark", "translation"):
        return []
    if data_root is None:
        return [("source", "needs data_root: set data_root in the spec or NCFT_DATA_ROOT")]
    files = data_files(task, data_root)
    missing = [p for p in files.values() if not p.is_file()]
    if missing:
        return [("source", f"file {p} does not exist (under data_root {data_root})")
                for p in missing]
    if "labels" not in files:
        return []
    known = json.loads(files["labels"].read_text(encoding="utf-8"))
    if task.labels is None:
        task.labels = list(known)
    elif set(task.labels) != set(known):
        return [("labels", f"must be the labels of {task.source.name} (any order): {known}")]
    return []
