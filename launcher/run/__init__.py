"""Running an experiment: from a validated spec to a finished run directory.

- `experiment`: `ncft run` (spawn or join ranks, orchestrate the stages).
- `preflight`: what `ncft run` checks before it creates or spawns anything.
- `models`, `task_data`: resolve the model and read task data.
- `rundir`, `checkpoint`, `progress`: the run directory, stage checkpoints, mid-task
  checkpoints.
- `studies`, `neft`: the analyses around the continual sequence.
- `spawn`: start local ranks (a failed rank is reported in one line) or detect an
  outer launcher.
- `masked_train`: `ncft masked-train`, the mask contract on any text file.
"""
