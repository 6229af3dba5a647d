"""Pure analyses of runs: functions of results, neuron sets and tensors, no engine.

Each analysis returns JSON-ready data (`results`: continual metrics, the deactivation
and fine-tuning matrices; `overlap`: IoU of neuron sets; `similarity`: per-layer
parameter similarity; `neft_stats` and `neft_utilization`: NeFT's rank shifts;
`bootstrap`: confidence intervals), `plots` draws each one to PNG, and
`report.write_report(run_dir)` runs all whose inputs exist.

What needs a model on an engine (switching units off, fine-tuning per task,
hidden-state statistics) is a study: `ncft.studies`.
"""
