"""Studies that run on an engine: they fine-tune, switch units off or read activations.

- `deactivate`: switch a NeuronSet's units off (activations or weights) and score.
- `deactivation`: Leng & Xiong's deactivation grid; `finetune_matrix`: their
  fine-tuning matrix; `similarity`: their parameter-similarity protocol.
- `utilization`: NeFT §6.1's hidden-state Pearson scores.
- `run`: `RunStudies`, the studies of one `ncft run` on its backend and directory;
  `score_files`: the probe-score files they keep.

Each hands its numbers to a pure analysis (`ncft.analysis`), which needs no engine.
"""
