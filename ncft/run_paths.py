"""The run directory's paths (docs/architecture.md §7): every path in it is named here.

```
RUN/spec.resolved.yaml          the spec after defaults and overrides
RUN/neurons/<task>.safetensors  selected NeuronSets (+ .json sidecars)
RUN/metrics.jsonl               one JSON object per logged step (rank 0)
RUN/results.json                accuracy matrix, CL summary, per-task scores
RUN/deactivation.json           the deactivation study, when enabled
RUN/similarity_paper.json       Leng & Xiong's parameter-similarity study, when enabled
RUN/checkpoints/NN-<task>/      model.safetensors + state.json after each task
RUN/checkpoints/in-progress/    per-rank mid-task checkpoints
RUN/neft/<task>.*               NeFT §6.1 utilization (Pearson scores, ΔRank); the
                                weight-movement probe scores and their rank shift
RUN/wncft/                      W-NCFT's task store (resume)
RUN/tensorboard/                event files, when enabled
RUN/final/                      consolidated HF model
RUN/plots/*.png                 figures
RUN/analysis/*.json             what `ncft report` computed
RUN/report.md                   the Markdown report
```

Why here and not in the launcher: the launcher writes a run directory and
`ncft.analysis.report` reads one, and ncft must not import the launcher. So the
names live in this small dependency-free module, and `launcher.run.rundir` builds
the directory's life cycle (create, refuse, resume, clean up) on it. `RunPaths`
only computes paths; it never touches the disk except to list stage directories.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STAGE_STATE = "state.json"  # written last into a stage checkpoint: marks it complete


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run directory."""

    root: Path

    @property
    def spec(self) -> Path:
        """The resolved spec."""
        return self.root / "spec.resolved.yaml"

    @property
    def neurons(self) -> Path:
        """Folder of the selected NeuronSets."""
        return self.root / "neurons"

    @property
    def metrics(self) -> Path:
        """The per-step metrics log."""
        return self.root / "metrics.jsonl"

    @property
    def results(self) -> Path:
        """The run's results."""
        return self.root / "results.json"

    @property
    def deactivation(self) -> Path:
        """The deactivation study's grid."""
        return self.root / "deactivation.json"

    @property
    def similarity_paper(self) -> Path:
        """Leng & Xiong's parameter-similarity study (one fine-tuned model per task)."""
        return self.root / "similarity_paper.json"

    @property
    def checkpoints(self) -> Path:
        """Folder of the stage checkpoints."""
        return self.root / "checkpoints"

    @property
    def in_progress(self) -> Path:
        """Folder of the mid-task checkpoints."""
        return self.checkpoints / "in-progress"

    @property
    def neft(self) -> Path:
        """Folder of NeFT's probe scores and rank shifts."""
        return self.root / "neft"

    @property
    def wncft(self) -> Path:
        """W-NCFT's task store."""
        return self.root / "wncft"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files."""
        return self.root / "tensorboard"

    @property
    def final(self) -> Path:
        """The consolidated HF model."""
        return self.root / "final"

    @property
    def plots(self) -> Path:
        """Folder of the figures."""
        return self.root / "plots"

    @property
    def analysis(self) -> Path:
        """Folder of the report's analysis JSON files."""
        return self.root / "analysis"

    @property
    def report(self) -> Path:
        """The Markdown report."""
        return self.root / "report.md"

    def stage_dir(self, index: int, task: str) -> Path:
        """Checkpoint directory of stage `index` (0-based), which trained `task`."""
        return self.checkpoints / f"{index + 1:02d}-{task}"

    def stage_dirs(self) -> Iterator[tuple[int, Path]]:
        """(0-based index, directory) of every stage checkpoint directory, in order."""
        for path in sorted(self.checkpoints.glob("[0-9][0-9]-*")):
            yield int(path.name[:2]) - 1, path

    def in_progress_dir(self, index: int, task: str) -> Path:
        """Mid-task checkpoints of stage `index` (0-based)."""
        return self.in_progress / self.stage_dir(index, task).name

    def neuron_file(self, task: str) -> Path:
        """The NeuronSet selected for `task`."""
        return self.neurons / f"{task}.safetensors"

    def neft_scores(self, task: str, when: str) -> Path:
        """NeFT's probe scores of `task`, `when` "before" or "after" its training."""
        return self.neft / f"{task}.{when}.safetensors"

    def neft_shift(self, task: str) -> Path:
        """The weight-movement rank shift of `task` (not NeFT's §6.1 measure)."""
        return self.neft / f"{task}.rank_shift.json"

    def neft_pearson(self, task: str, when: str) -> Path:
        """NeFT §6.1 max Pearson scores of `task`, `when` "before" or "after" its training."""
        return self.neft / f"{task}.pearson_{when}.safetensors"

    def neft_utilization(self, task: str) -> Path:
        """NeFT §6.1 utilization shift (ΔRank, categories) of `task`."""
        return self.neft / f"{task}.utilization.json"
