"""Running an experiment: from a validated spec to a finished run directory.

- `experiment`: `ncft run` (spawn or join ranks, orchestrate the stages and studies).
- `backend`: `LauncherBackend`, the services the continual loop and the studies call
  (models, engines, NeuronSets, checkpoints, logs); `load_stage_model` reads a stage.
- `selector`: the spec's selection pipeline, for runs and `ncft neurons score`.
- `preflight`: what `ncft run` checks before it creates or spawns anything.
- `models`, `task_data`: resolve the model and read task data.
- `rundir`, `checkpoint`, `progress`, `delta_weights`: the run directory's life
  cycle, stage checkpoints, mid-task checkpoints, sparse-delta weights.
- `preempt`: SIGTERM to a checkpoint and a requeued resume.
- `spawn`: start local ranks (a failed rank is reported in one line) or detect an
  outer launcher.
- `masked_train`: `ncft masked-train`, the mask contract on any text file.

The studies themselves live in `ncft.studies` (`RunStudies`).
"""
