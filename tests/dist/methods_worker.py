"""Every training method through `ncft run` on the tiny model, one process, in turn.

Run by tests/launcher/run/test_methods.py; each run is a real `main_run` (world of one,
single engine) writing a complete run directory.
"""

import sys
from pathlib import Path

from launcher.run.experiment import main_run

REPO = Path(__file__).resolve().parents[2]
SPEC = str(REPO / "examples" / "tiny_ncft.yaml")


def sizes(num_tasks: int) -> list[str]:
    return [f"tasks.{i}.{k}={v}" for i in range(num_tasks)
            for k, v in (("train_size", 8), ("eval_size", 4), ("max_length", 176))]


RUNS = {
    "full": ["method=full"],
    "neurons": ["method=neurons"],
    "random_neurons": ["method=random_neurons"],
    "lora": ["method=lora", "lora.target_modules=[q_proj,v_proj]"],
    "neft_rows": ["method=neurons", "selection.scorer=weight_cosine", "selection.unit=row",
                  "selection.cosine_steps=2", "selection.modules=[gate,up,down,attention]",
                  "output.report=true"],
    "random_rows": ["method=random_neurons", "selection.scorer=weight_cosine",
                    "selection.unit=row", "selection.cosine_steps=2",
                    "selection.modules=[gate,up,down,attention]"],
    "seqft": ["method=seqft", "eval.calibration=content_free"],
    "seqlora": ["method=seqlora"],
    "wncft": ["method=wncft", "wncft.num_samples=4", "output.tensorboard=true",
              # the studies: deactivation (by weights) with the fine-tuning matrix, and
              # Leng & Xiong's similarity protocol beside the final-model variant
              "study.deactivation=true", "study.deactivation_mode=weights",
              "study.finetune_matrix=true", "study.similarity=both", "study.finetune_steps=2",
              "study.finetune_lr=0.003",
              "study.eval_examples=4", "study.neft_utilization=true", "output.report=true"],
    "olora": ["method=olora", "olora.lambda_l2=0.1"],
    "wncft_example": ["method=wncft", "wncft.num_samples=4", "wncft.query=example",
                      "eval.classification=generate", "eval.max_new_tokens=3"],
    "per_task": ["method=per_task"],
}
SINGLE_TASK = {"full", "neurons", "random_neurons", "lora", "neft_rows", "random_rows"}


def overrides(name: str, out: Path) -> list[str]:
    """The spec overrides of run `name`, writing into `out/name`."""
    num_tasks = 1 if name in SINGLE_TASK else 2
    tasks = ["tasks=[{source: {type: cl_benchmark, name: sst2}},"
             "{source: {type: cl_benchmark, name: rte}}]" if num_tasks == 2 else
             "tasks=[{source: {type: cl_benchmark, name: sst2}}]"]
    return [*tasks, *sizes(num_tasks), "engine.backend=single", "engine.nproc_per_node=1",
            "training.steps=2", "selection.num_examples=4", "eval.batch_size=4",
            f"output.dir={out / name}", *RUNS[name]]


def main(out: Path, names: list[str]) -> None:
    for name in names:
        main_run(SPEC, overrides(name, out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
